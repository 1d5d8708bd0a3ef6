"""Stopping the real `flux-mcp` command: the MCP client's own shutdown, SIGTERM, SIGINT, on every transport.

A stop must keep every paid job the provider accepted (its id journaled, so a new server answers
check_prediction for it), leave no temp file behind, and exit quietly with status 0.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from PIL import Image

from flux_mcp.media import STALE_IN_DATA_FOLDER, STALE_NEXT_TO_SAVE_TO
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake, Job
from tests.fakes.wire import free_port, serve_on_loopback
from tests.subprocess_helpers import child_env, flux_command, wait_for_port

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


class HeldSync(AtlasFake):
    """Atlas Cloud whose sync-mode submits stay open until the test calls `finish(id)` (the job's end)."""

    async def _sync_wait(self, job: Job) -> None:
        deadline = time.monotonic() + self.sync_timeout
        while not job.done and time.monotonic() < deadline:
            await anyio.sleep(0.01)


@pytest.fixture
def held() -> Iterator[HeldSync]:
    fake = HeldSync(key=ATLAS_KEY)
    with serve_on_loopback(fake) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def fake(loopback_fake: AtlasFake) -> AtlasFake:
    return loopback_fake


def server_env(fake: AtlasFake, home: Path, **extra: str) -> dict[str, str]:
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url,  # type: ignore[attr-defined]
                     FLUX_MCP_LOG_LEVEL="INFO", **extra)


def stdio(env: dict[str, str], cwd: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env, cwd=str(cwd))


def call(request_id: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}


def wait_until(condition: Callable[[], object], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


async def wait_until_async(condition: Callable[[], object]) -> None:
    while not condition():
        await anyio.sleep(0.02)


class Server:
    """`flux-mcp` in a child process with JSON-RPC lines on its stdin/stdout and its log in a file."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str, pipes: bool = True):
        self.log = cwd / f".server-{time.monotonic_ns()}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(flux_command(*args), env=env, cwd=cwd, stderr=self._log,
                                     stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipes else self._log)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, request_id: int, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            assert ready, f"no answer to {request_id} within {timeout} s"
            line = self.proc.stdout.readline()
            assert line, "the server closed stdout"
            message = json.loads(line)
            if message.get("id") == request_id:
                return message

    def initialize(self) -> None:
        self.send(INIT)
        self.answer(0)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def logged(self) -> str:
        return self.log.read_text()

    def exit_status(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


async def check(env: dict[str, str], cwd: Path, prediction_id: str) -> dict[str, Any]:
    """What a new server on the same data folder answers for `prediction_id`."""
    async with Client(stdio(env, cwd)) as client:
        result = await client.call_tool("check_prediction", {"prediction_id": prediction_id})
    assert not result.is_error, text_of(result)
    return result.structured_content


# --- the paid job in flight is kept --------------------------------------------------------------

async def test_the_mcp_clients_own_shutdown_during_a_held_submit_journals_the_job(held, home, workspace):
    env = server_env(held, home)
    log = workspace / "server.log"

    async def finish_the_job_once_sigterm_arrived() -> None:
        # The client closed stdin (the stop began) and, two seconds later, sent SIGTERM: only now does
        # the provider answer, so the job is journaled only if SIGTERM, too, waits for it.
        await wait_until_async(lambda: "SIGTERM received; still waiting for the atlascloud" in log.read_text())
        held.finish(next(iter(held.jobs)))

    with log.open("w") as errlog, anyio.fail_after(60):
        async with anyio.create_task_group() as outer:
            outer.start_soon(finish_the_job_once_sigterm_arrived)
            async with (Client(stdio_client(stdio(env, workspace), errlog=errlog)) as client,
                        anyio.create_task_group() as tg):
                tg.start_soon(client.call_tool, "generate_image", {"prompt": "a held job"})
                await wait_until_async(lambda: held.jobs)  # the submit is out, its answer held
                tg.cancel_scope.cancel()
            # Leaving the client is the SDK's shutdown: stdin closed, SIGTERM, SIGKILL if still alive; it
            # returns once the server is gone.
            outer.cancel_scope.cancel()
    logged = log.read_text()
    assert "every job a provider accepted is journaled" in logged, logged
    assert "Traceback" not in logged
    [job_id] = held.jobs
    assert held.ledger[0]["enable_sync_mode"] is True  # it was a held submit
    data = await check(env, workspace, f"atlascloud:{job_id}")
    assert data["status"] == "succeeded" and Path(data["images"][0]["path"]).is_file()
    assert len(held.ledger) == 1


def test_sigterm_with_stdin_open_refuses_new_calls_and_keeps_the_held_job(held, home, workspace):
    env = server_env(held, home)
    with Server(env, workspace) as server:
        server.initialize()
        server.send(call(1, "generate_image", prompt="a held job"))
        wait_until(lambda: held.jobs, "the submit")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping (SIGTERM)" in server.logged(), "the stop to begin")
        server.send(call(2, "generate_image", prompt="one more"))
        refused = server.answer(2)["result"]
        server.send(call(3, "check_prediction", prediction_id="atlascloud:pred_x"))
        refused_check = server.answer(3)["result"]
        held.finish(next(iter(held.jobs)))
        status = server.exit_status()
        logged = server.logged()
    assert status == 0, logged
    assert refused["isError"] and "shutting down" in refused["content"][0]["text"]
    assert refused_check["isError"] and "shutting down" in refused_check["content"][0]["text"]
    assert len(held.ledger) == 1 and "Traceback" not in logged
    [job_id] = held.jobs
    assert anyio.run(check, env, workspace, f"atlascloud:{job_id}")["status"] == "succeeded"


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
async def test_sigterm_over_http_keeps_the_held_job_and_exits_quietly(held, home, workspace, transport):
    env = server_env(held, home)
    port = free_port()
    with Server(env, workspace, "serve", "--transport", transport, "--port", str(port), pipes=False) as server:
        wait_for_port(port, server.proc)
        url = f"http://127.0.0.1:{port}/mcp" if transport == "streamable-http" else f"http://127.0.0.1:{port}/sse"
        results: list[Any] = []
        with anyio.fail_after(60):
            async with (Client(url if transport == "streamable-http" else sse_client(url)) as client,
                        anyio.create_task_group() as tg):

                async def held_call() -> None:
                    results.append(await client.call_tool("generate_image", {"prompt": "a held job"}))

                tg.start_soon(held_call)
                await wait_until_async(lambda: held.jobs)
                server.proc.send_signal(signal.SIGTERM)
                await wait_until_async(lambda: "stopping (SIGTERM)" in server.logged())
                refused = await client.call_tool("generate_image", {"prompt": "one more"})
                held.finish(next(iter(held.jobs)))
            status = await anyio.to_thread.run_sync(server.exit_status)
        logged = server.logged()
    assert status == 0, logged
    assert refused.is_error and "shutting down" in text_of(refused)
    assert results[0].structured_content["status"] == "succeeded", text_of(results[0])
    assert len(held.ledger) == 1 and "Traceback" not in logged
    [job_id] = held.jobs
    assert (await check(env, workspace, f"atlascloud:{job_id}"))["status"] == "succeeded"


def test_sigint_stops_quietly_while_a_job_is_waited_on(fake, home, workspace):
    fake.hold = True
    env = server_env(fake, home, ATLASCLOUD_SYNC_MODE="off")
    with Server(env, workspace) as server:
        server.initialize()
        server.send(call(1, "generate_image", prompt="p", wait_seconds=300))
        wait_until(lambda: any(r.startswith("GET /api/v1/model/prediction/") for r in fake.requests), "the wait")
        server.proc.send_signal(signal.SIGINT)
        status = server.exit_status()
        logged = server.logged()
    assert status == 0
    assert "Traceback" not in logged and "KeyboardInterrupt" not in logged
    assert "stopping (SIGINT)" in logged and "stopped" in logged
    [job_id] = fake.jobs
    fake.finish(job_id)
    assert anyio.run(check, env, workspace, f"atlascloud:{job_id}")["status"] == "succeeded"


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX terminal")
def test_ctrl_c_at_a_terminal_stops_quietly(fake, home, workspace):
    import pty
    import tty

    controller, terminal = pty.openpty()
    tty.setraw(terminal)  # no echo: what the controller reads is the server's output
    log = workspace / "server.log"
    try:
        with log.open("wb") as errlog:
            proc = subprocess.Popen(flux_command(), env=server_env(fake, home), cwd=workspace, stdin=terminal,
                                    stdout=terminal, stderr=errlog)
            try:
                os.write(controller, json.dumps(INIT).encode() + b"\n")
                seen = b""
                while b'"serverInfo"' not in seen:  # serving: the handshake is answered
                    ready, _, _ = select.select([controller], [], [], 30)
                    assert ready, "no answer from the server"
                    seen += os.read(controller, 65536)
                proc.send_signal(signal.SIGINT)
                status = proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        os.close(controller)
        os.close(terminal)
    logged = log.read_text()
    assert status == 0, logged
    assert "Traceback" not in logged and "KeyboardInterrupt" not in logged


# --- temp files ----------------------------------------------------------------------------------

class Created:
    """The names of files created in some folders, as the kernel reports them (Linux inotify)."""

    IN_CREATE = 0x100

    def __init__(self, *folders: Path):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.folders = {self._libc.inotify_add_watch(self.fd, str(f).encode(), self.IN_CREATE): f for f in folders}
        self._pending: list[Path] = []

    def next(self, timeout: float = 60) -> Path:
        while not self._pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"no file created within {timeout} s"
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                self._pending.append(self.folders[wd] / name)
                offset += 16 + length
        return self._pending.pop(0)

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches the folders with inotify")
def test_no_temp_file_survives_a_sigterm_mid_write(fake, home, workspace):
    # Large incompressible images: each write takes long enough for the test to freeze the server while a
    # temp file is provably there, then send SIGTERM.
    fake.noisy_images, fake.image_size = True, (3000, 3000)
    env = server_env(fake, home, ATLASCLOUD_SYNC_MODE="off")
    kept, saved = home / "images" / "atlascloud", workspace / "out"
    kept.mkdir(parents=True)
    saved.mkdir()
    created = Created(kept, saved)
    caught: Path | None = None
    try:
        with Server(env, workspace) as server:
            server.initialize()
            for attempt in range(1, 4):
                server.send(call(attempt, "generate_image", prompt=f"big {attempt}", save_to="out/",
                                 wait_seconds=120))
                while caught is None:
                    path = created.next()
                    if not path.name.endswith(".part"):
                        if path.parent == saved:
                            break  # this job's last write is done: none was caught mid-way, try another
                        continue
                    server.proc.send_signal(signal.SIGSTOP)
                    if path.exists():
                        caught = path  # frozen with the temp file there: the write is under way
                    else:
                        server.proc.send_signal(signal.SIGCONT)
                if caught is not None:
                    break
                server.answer(attempt, timeout=120)
            assert caught is not None, "no write was caught under way in three jobs"
            server.proc.send_signal(signal.SIGTERM)
            server.proc.send_signal(signal.SIGCONT)
            status = server.exit_status()
            logged = server.logged()
    finally:
        created.close()
    assert status == 0, logged
    assert "Traceback" not in logged
    leftovers = [p for folder in (kept, saved) for p in folder.iterdir() if p.name.endswith(".part")]
    assert leftovers == []
    for image in [*kept.iterdir(), *saved.iterdir()]:
        with Image.open(image) as im:
            im.load()  # whatever is there under its final name is whole


def test_stale_temp_files_in_the_data_folder_are_swept_at_start(fake, home, workspace):
    folder = home / "images" / "atlascloud"
    folder.mkdir(parents=True)
    stale, live, image = folder / ".flux-00112233aabbccdd.part", folder / ".flux-44556677eeff0011.part", \
        folder / "pred_1-0a1b2c3d-0.png"
    for path in (stale, live, image):
        path.write_bytes(b"partial")
    long_ago = time.time() - STALE_IN_DATA_FOLDER - 60
    for path in (stale, image):
        os.utime(path, (long_ago, long_ago))
    with Server(server_env(fake, home), workspace) as server:
        server.initialize()
        logged = server.logged()
    assert not stale.exists()
    assert live.exists() and image.exists()  # another process may be writing that one right now
    assert "removed 1 stale temp file(s)" in logged


async def test_a_save_to_write_sweeps_stale_temp_files_beside_it(settings, workspace):
    from tests.fakes.atlascloud import AtlasFake as InProcessFake

    out = workspace / "public"
    out.mkdir()
    stale, recent = out / ".flux-8899aabbccddeeff.part", out / ".flux-0011223344556677.part"
    for path in (stale, recent):
        path.write_bytes(b"partial")
    os.utime(stale, (time.time() - STALE_NEXT_TO_SAVE_TO - 60,) * 2)
    os.utime(recent, (time.time() - 600,) * 2)
    async with connect(settings, InProcessFake(key=ATLAS_KEY)) as client:
        result = await client.call_tool("generate_image", {"prompt": "a fox", "save_to": "public/fox.png"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    assert (out / "fox.png").is_file()
    assert not stale.exists() and recent.exists()
