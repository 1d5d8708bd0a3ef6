"""The in-flight registry and the graceful stop, driven directly (no process, no signals)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from flux_mcp import files, media
from flux_mcp.lifecycle import GracefulStop, Inflight, ServerStopping, SubmitAbandoned, graceful_stop

pytestmark = pytest.mark.anyio


async def test_a_stop_waits_for_the_submit_in_flight_then_stops_serving():
    registry = Inflight()
    answered = anyio.Event()
    journaled: list[str] = []
    stopped: list[bool] = []

    async def paid_call() -> None:
        with registry.submitting("a test job"):
            await answered.wait()  # the provider's answer
            journaled.append("job-1")

    with anyio.fail_after(5):
        async with graceful_stop(stopped.append, registry=registry, signals=False) as stop:
            async with anyio.create_task_group() as tg:
                tg.start_soon(paid_call)
                await anyio.wait_all_tasks_blocked()
                stop.request("SIGTERM")
                await anyio.wait_all_tasks_blocked()
                assert stopped == [] and registry.stopping  # still waiting for the answer
                answered.set()
            await anyio.wait_all_tasks_blocked()
    assert journaled == ["job-1"] and stopped == [False]


async def test_no_submit_starts_once_the_stop_began():
    registry = Inflight()
    registry.stopping = True
    with pytest.raises(ServerStopping, match="shutting down"), registry.submitting():
        pytest.fail("a paid submit was started during a stop")
    with pytest.raises(ServerStopping, match="Nothing was sent"):
        registry.refuse_new()


async def test_a_submit_outlives_its_callers_cancellation():
    registry = Inflight()
    finished = []
    with anyio.fail_after(5):
        with anyio.CancelScope() as caller:
            with registry.submitting():
                caller.cancel()  # the client gave up on the call
                await anyio.lowlevel.checkpoint()  # waiting for the answer: not cancelled
                finished.append(True)
            await anyio.sleep_forever()  # ...after which the cancellation applies
    assert finished == [True] and caller.cancelled_caught


async def test_a_stop_that_runs_out_of_time_abandons_the_submit_and_says_so(caplog):
    registry = Inflight()
    outcome: list[BaseException] = []

    async def paid_call() -> None:
        try:
            with registry.submitting("a slow job"):
                await anyio.sleep_forever()
        except SubmitAbandoned as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with graceful_stop(registry=registry, timeout=0.05, signals=False) as stop:
            with stop.serving:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(paid_call)
                    await anyio.wait_all_tasks_blocked()
                    stop.request("SIGTERM")
                    await anyio.sleep_forever()  # serving goes on until the stop ends it
    assert stop.serving.cancelled_caught
    assert len(outcome) == 1 and "dashboard" in str(outcome[0])
    assert "a slow job" in caplog.text and "no record here" in caplog.text


async def test_a_second_ctrl_c_skips_the_wait_but_a_later_sigterm_does_not():
    registry = Inflight()
    stopped: list[bool] = []
    stop = GracefulStop(registry, timeout=60, stop_serving=stopped.append)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop.run)

            async def paid_call() -> None:
                with pytest.raises(SubmitAbandoned), registry.submitting():
                    await anyio.sleep_forever()

            tg.start_soon(paid_call)
            await anyio.wait_all_tasks_blocked()
            stop.request("SIGINT")
            stop.request("SIGTERM")  # what the MCP client sends two seconds after closing stdin
            await anyio.wait_all_tasks_blocked()
            assert stopped == []
            stop.request("SIGINT")
    assert stopped == [True]


async def test_the_stop_removes_temp_files_of_writes_still_under_way(tmp_path: Path):
    target = tmp_path / "image.png"
    started, release = anyio.Event(), anyio.Event()
    real_create = files._TEMPS.create

    def create_and_pause(tmp: Path) -> int:
        fd = real_create(tmp)
        anyio.from_thread.run_sync(started.set)
        anyio.from_thread.run(release.wait)  # the write is under way when the stop ends
        return fd

    files._TEMPS.create = create_and_pause  # type: ignore[method-assign]
    try:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async def write() -> None:
                    with pytest.raises(FileNotFoundError):  # its temp file was removed under it
                        await anyio.to_thread.run_sync(lambda: media.atomic_write(target, b"x" * 1000,
                                                                                 overwrite=False))

                tg.start_soon(write)
                await started.wait()
                assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
                async with graceful_stop(registry=Inflight(), signals=False):
                    pass
                assert list(tmp_path.iterdir()) == []
                release.set()
    finally:
        files._TEMPS.create = real_create  # type: ignore[method-assign]
    assert list(tmp_path.iterdir()) == []


def test_only_stale_temp_files_are_swept(tmp_path: Path):
    sub = tmp_path / "images" / "atlascloud"
    sub.mkdir(parents=True)
    old, fresh, image, other = (sub / ".flux-0123456789abcdef.part", sub / ".flux-fedcba9876543210.part",
                                sub / "pred-1.png", sub / "notes.part")
    for path in (old, fresh, image, other):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old, image, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert media.sweep_stale_temp_files(tmp_path / "images", media.STALE_IN_DATA_FOLDER, recursive=True) == 1
    assert not old.exists() and fresh.exists() and image.exists() and other.exists()
    assert media.sweep_stale_temp_files(tmp_path / "missing", 60) == 0
