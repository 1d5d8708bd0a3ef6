"""Concurrency: many simultaneous `generate_image` calls through one streamable-HTTP server.

The calls use the default model (flux-schnell, whose jobs are answered on their held submit); the
same burst with Atlas sync mode off (every job polled, its image downloaded) is run too and reported
beside it. A few calls in a row come first (the journal learns the 2-second jobs), then the baseline —
one call on its own, the median of a few — and then N calls at once, each from its own MCP session with its own
connection (opened beforehand, as N separate clients would be). Wall time runs from releasing the N
calls to the last answer. Peak RSS is the server process's high-water mark (VmHWM) from /proc.

The floor: the bare SDK server (bench/floor_server.py) answering N simultaneous calls of a tool that
sleeps for the job's length — what the SDK and the transport alone cost for the same load, on the
same machine, in the same run.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

from .common import (
    FakeProcess,
    base_env,
    cpu_seconds,
    floor_command,
    flux_command,
    flux_env,
    http_server,
    job_prompt,
    p50,
    peak_rss_kb,
)
from .raw import AsyncRawHttp

GOAL_RATIO = 1.25


async def _call(
    session: AsyncRawHttp, tool: str, arguments: dict[str, Any], done: str | None
) -> tuple[float, bool]:
    start = time.perf_counter()
    try:
        result = await session.call(tool, arguments)
        ok = not result.get("isError") and (done is None or result["structuredContent"]["status"] == done)
    except Exception:  # noqa: BLE001 - any failure counts as an error of the figure; the run goes on
        ok = False
    return time.perf_counter() - start, ok


async def _burst(
    url: str,
    pid: int,
    calls: int,
    tool: str,
    arguments: dict[str, Any],
    done: str | None,
    warmups: int,
    singles: int,
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:

        async def session() -> AsyncRawHttp:
            # One connection per session, as separate clients have: a shared pool of N connections costs
            # the client itself O(N) work per request (httpcore rescans it), which is not the server's.
            http = await stack.enter_async_context(httpx2.AsyncClient(timeout=120, trust_env=False))
            s = AsyncRawHttp(f"{url}/mcp", http)
            await s.initialize()
            return s

        first = await session()
        for _ in range(warmups):
            await _call(first, tool, arguments, done)
        single = [(await _call(first, tool, arguments, done))[0] for _ in range(singles)]
        clients: list[AsyncRawHttp] = []

        async def open_one() -> None:
            clients.append(await session())

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(open_one)
        rss_idle, _ = peak_rss_kb(pid)
        outcomes: list[tuple[float, bool]] = []
        go = anyio.Event()

        async def one(client: AsyncRawHttp) -> None:
            await go.wait()
            outcomes.append(await _call(client, tool, arguments, done))

        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(one, client)
            await anyio.sleep(0.2)  # every task is parked on the event
            cpu_before = cpu_seconds(pid)
            start = time.perf_counter()
            go.set()
        wall = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu_before
    rss_now, rss_peak = peak_rss_kb(pid)
    return {
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_per_call_ms": cpu / calls * 1000,
        "single_s": single,
        "single_p50": p50(single),
        "call_p50": p50([s for s, _ in outcomes]),
        "call_max": max((s for s, _ in outcomes), default=0.0),
        "errors": sum(not ok for _, ok in outcomes),
        "rss_idle_kb": rss_idle,
        "rss_peak_kb": rss_peak,
        "rss_after_kb": rss_now,
    }


def run(
    workdir: Path, fake: FakeProcess, *, calls: int, job: float = 2.0, warmups: int = 3, singles: int = 3
) -> dict[str, Any]:
    """The default configuration (flux-schnell: each job answered on its held submit, images inline) is
    the judged figure; the same burst with sync mode off (every job polled, images downloaded) is
    reported beside it."""
    fake.serve_image("png", 64, 64, "flat")
    args = {"prompt": job_prompt(job, "bench concurrency"), "wait_seconds": 60}
    root = workdir / "concurrency"
    root.mkdir(parents=True, exist_ok=True)
    with http_server(floor_command(), base_env(root), root, root / "floor-http.log") as (url, proc):
        floor = anyio.run(_burst, url, proc.pid, calls, "wait", {"seconds": job}, None, 1, singles)
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in (("held", {}), ("polled", {"ATLASCLOUD_SYNC_MODE": "off"})):
        home = root / name
        # A hundred clients on one machine: the per-address session limit is for real networks.
        env = flux_env(home, fake.url, FLUX_MCP_SESSIONS_PER_CLIENT="500", **extra)
        cmd = [*flux_command(), "serve", "--transport", "streamable-http"]
        with http_server(cmd, env, home / "workspace", home / "flux-http.log") as (url, proc):
            result = anyio.run(_burst, url, proc.pid, calls, "generate_image", args, "succeeded", warmups, singles)
        wall = result["wall_s"]
        runs[name] = {
            **result,
            "ratio_to_job": wall / job,
            "ratio_to_single": wall / result["single_p50"],
            "ratio_to_floor": wall / floor["wall_s"],
            "met": wall <= GOAL_RATIO * job and result["errors"] == 0,
        }
    return {
        "calls": calls,
        "job_s": job,
        **runs["held"],
        "polled": runs["polled"],
        "floor": floor,
        "goal": f"wall <= {GOAL_RATIO:g} x one job ({GOAL_RATIO * job:g} s), zero errors",
    }


def figures(result: dict[str, Any]) -> dict[str, float]:
    """What `--before` compares of a `run()`: held and polled wall against the job, held CPU against the floor's."""
    return {"ratio_to_job": result["ratio_to_job"], "polled_ratio_to_job": result["polled"]["ratio_to_job"],
            "cpu_to_floor": result["server_cpu_per_call_ms"] / result["floor"]["server_cpu_per_call_ms"]}
