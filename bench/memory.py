"""Memory: one streamable-HTTP server while 4 jobs at once return the largest images the providers document.

The largest output any provider documents for a model that renders the size asked is 2048x2048 (Segmind,
AppyPie, ImagePipeline; Atlas Cloud stops at 1536, AceDataCloud's ratio models set their own ~1-4 MP). The
bench fake is Atlas Cloud's, so each job asks for Atlas's largest size (1536x1536) and the fake answers a
real, photo-like 2048x2048 PNG (about 7 MB, 12 MB of pixels) — what a FLUX model answering larger than asked
sends. Two ways in: the default (Atlas sync mode: the image inline, base64, in the submit's answer), and
sync mode off (every image downloaded) with a `.webp` save_to beside the kept PNG (a conversion on top).

Per variant, in one fresh server: one small call first (everything imported, caches warm), then the idle
RSS (VmRSS); then one such job alone and then 4 at once, each time from a reset high-water mark (VmHWM,
reset through /proc/<pid>/clear_refs), 4 at once `rounds` times (the largest peak is reported). Linux only.

`python -m bench.memory` runs this figure alone and adds it to bench/results/latest.md and .json (the other
figures stay as their last full run left them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import anyio
import httpx2

from .common import BENCH, FakeProcess, dump, flux_command, flux_env, http_server, peak_rss_kb
from .raw import AsyncRawHttp

SIDE = 2048
"""The largest width and height any provider documents for an exact-size model."""
ASKED = 1536
"""Atlas Cloud's largest documented size: what each job asks the (Atlas) fake for."""
JOBS = 4
VARIANTS = (
    ("inline", "sync mode (image inline in the answer), kept as PNG", {}, None),
    ("downloaded", "sync mode off (image downloaded), kept as PNG + save_to .webp", {"ATLASCLOUD_SYNC_MODE": "off"},
     "webp"),
)


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _calls(url: str, args: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One session (and connection) per call, all released at once; returns the structured results."""
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for _ in args:
            http = await stack.enter_async_context(httpx2.AsyncClient(timeout=300, trust_env=False))
            session = AsyncRawHttp(f"{url}/mcp", http)
            await session.initialize()
            sessions.append(session)
        results: list[dict[str, Any]] = [{} for _ in args]

        async def one(i: int) -> None:
            results[i] = await sessions[i].call("generate_image", args[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(args)):
                tg.start_soon(one, i)
    return results


def _ok(result: dict[str, Any]) -> bool:
    sc = result.get("structuredContent") or {}
    return (not result.get("isError") and sc.get("status") == "succeeded"
            and all(i.get("path") and (i.get("width"), i.get("height")) == (SIDE, SIDE) for i in sc.get("images", []))
            and bool(sc.get("images")))


def _variant(workdir: Path, fake: FakeProcess, name: str, extra: dict[str, str], save: str | None,
             rounds: int) -> dict[str, Any]:
    home = workdir / f"memory-{name}"
    env = flux_env(home, fake.url, **extra)
    cwd = home / "workspace"
    with http_server([*flux_command(), "serve", "--transport", "streamable-http"], env, cwd,
                     home / "server.log") as (url, proc):
        fake.serve_image("png", 64, 64, "flat")
        warm = anyio.run(_calls, url, [{"prompt": "bench memory warm-up", "width": 256, "height": 256}])
        time.sleep(0.5)  # the warm-up's buffers are released before the idle reading
        idle_kb, _ = peak_rss_kb(proc.pid)
        image = fake.serve_image("png", SIDE, SIDE, "photo")

        def job(i: int) -> dict[str, Any]:
            args: dict[str, Any] = {"prompt": f"bench memory {i}", "width": ASKED, "height": ASKED,
                                    "wait_seconds": 120}
            if save:
                args["save_to"] = f"out/{name}-{time.monotonic_ns()}-{i}.{save}"
            return args

        _reset_peak(proc.pid)
        single = anyio.run(_calls, url, [job(0)])
        _, single_peak_kb = peak_rss_kb(proc.pid)
        peaks: list[int] = []
        errors = sum(not _ok(r) for r in single) + sum(bool(r.get("isError")) for r in warm)
        for _ in range(rounds):
            _reset_peak(proc.pid)
            results = anyio.run(_calls, url, [job(i) for i in range(JOBS)])
            peaks.append(peak_rss_kb(proc.pid)[1])
            errors += sum(not _ok(r) for r in results)
        after_kb, _ = peak_rss_kb(proc.pid)
    peak_kb = max(peaks)
    return {
        "label": {v[0]: v[1] for v in VARIANTS}[name],
        "image_bytes": image.get("bytes"),
        "idle_kb": idle_kb,
        "single_peak_kb": single_peak_kb,
        "peak_kb": peak_kb,
        "peaks_kb": peaks,
        "after_kb": after_kb,
        "errors": errors,
        "rise_ratio": (peak_kb - idle_kb) / max(single_peak_kb - idle_kb, 1),
    }


def run(workdir: Path, fake: FakeProcess, *, rounds: int = 3) -> dict[str, Any]:
    if not Path("/proc/self/status").exists():
        return {"skipped": "reads /proc (Linux only)"}
    out: dict[str, Any] = {"jobs": JOBS, "side": SIDE, "asked": ASKED, "rounds": rounds, "variants": {}}
    for name, _, extra, save in VARIANTS:
        out["variants"][name] = _variant(workdir, fake, name, extra, save, rounds)
    out["measured"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return out


def main(argv: list[str] | None = None) -> int:
    from . import report

    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="bursts of 4 jobs per variant (default 3)")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="where latest.md/.json are")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flux-bench-memory-") as tmp, FakeProcess(Path(tmp)) as fake:
        figure = run(Path(tmp), fake, rounds=args.rounds)
    latest = args.out / "latest.json"
    results = json.loads(latest.read_text()) if latest.is_file() else None
    if results is None:
        print(json.dumps(figure, indent=2))
        return 0
    results["memory"] = figure
    (args.out / "latest.md").write_text(report.markdown(results))
    dump(latest, results)
    print("\n".join(report.summary({"memory": figure})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
