"""Provider health for "auto": what reading recent refusals from the journal adds to planning a call.

In one process, on an SQLite journal holding a busy day of failover attempts (ROWS rows over 24 h, of which
RECENT fall in the last 10 minutes, spread over the providers), `Chooser.plan` of an "auto" call is timed:
* as it runs (the refusals read at most every HEALTH_CACHE seconds, so nearly every call uses the cache);
* with the cache off (every call reads the journal: what a call pays when the cache has just expired);
* the baseline: the same plan with a health source that knows nothing and costs nothing (what the
  previous in-memory bookkeeping cost, at most).
The journal's query alone is timed too. Nothing leaves the process; no provider is contacted.

`python -m bench.health` runs this figure alone and adds it to bench/results/latest.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/health.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import anyio

from .common import BENCH, KEY, dump, p50, p95

ROWS = 10_000
RECENT = 300
GOAL_US = 100.0
"""The cached path may add at most this many microseconds to a call's planning (p50)."""


async def _measure(home: Path, samples: int) -> dict[str, Any]:
    from flux_mcp import choose
    from flux_mcp.config import Settings
    from flux_mcp.journal import Attempt, open_journal
    from flux_mcp.request import JobRequest
    from flux_mcp.service import FluxService

    env = {"FLUX_MCP_HOME": str(home), "ATLASCLOUD_API_KEY": KEY, "SEGMIND_API_KEY": KEY,
           "ACEDATACLOUD_API_TOKEN": KEY}
    settings = Settings.from_env(env, cwd=home)
    journal = open_journal(home)
    rng = random.Random(3)
    now = time.time()
    kinds = ("no_credit", "rate_limited", "unreachable", "bad_key", "refused")
    providers = ("atlascloud", "segmind", "acedatacloud", "imagepipeline", "appypie")
    ages = sorted([rng.uniform(600, 86_000) for _ in range(ROWS - RECENT)] + [rng.uniform(0, 590) for _ in range(RECENT)],
                  reverse=True)
    for age in ages:  # oldest first: each write trims only rows a day older than itself
        await journal.add_attempt(Attempt("local", rng.choice(providers), "flux-schnell", rng.choice(kinds),
                                          "bench refusal", at=now - age))
    service = FluxService(settings, client=None, journal=journal)  # type: ignore[arg-type]  # nothing is sent
    chooser = service.chooser
    req = JobRequest(prompt="bench", provider="auto")

    async def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await chooser.plan(req, None)
            out.append(time.perf_counter() - start)
        return out

    query = []
    for _ in range(samples):
        start = time.perf_counter()
        await journal.refusals_since(time.time() - choose.REFUSAL_MEMORY)
        query.append(time.perf_counter() - start)
    await timed(20)  # warm
    cached = await timed(samples)
    saved = choose.HEALTH_CACHE
    choose.HEALTH_CACHE = 0.0
    try:
        uncached = await timed(samples)
    finally:
        choose.HEALTH_CACHE = saved

    async def nothing() -> dict[str, Any]:
        return {}

    chooser.recent_refusals = nothing  # type: ignore[method-assign]
    baseline = await timed(samples)
    await journal.close()
    return {"query": query, "cached": cached, "uncached": uncached, "baseline": baseline}


def run(workdir: Path, *, samples: int = 500) -> dict[str, Any]:
    home = workdir / "health"
    home.mkdir(parents=True, exist_ok=True)
    s = anyio.run(_measure, home, samples)
    out: dict[str, Any] = {"rows": ROWS, "recent": RECENT, "samples": samples, "goal_us": GOAL_US}
    for name, values in s.items():
        out[name] = {"p50": p50(values), "p95": p95(values)}
    out["cached_minus_baseline_p50"] = out["cached"]["p50"] - out["baseline"]["p50"]
    out["uncached_minus_baseline_p50"] = out["uncached"]["p50"] - out["baseline"]["p50"]
    out["met"] = out["cached_minus_baseline_p50"] * 1e6 <= GOAL_US
    return out


def main(argv: list[str] | None = None) -> int:
    from . import report

    parser = argparse.ArgumentParser(prog="python -m bench.health", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="where latest.md/.json are")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flux-bench-health-") as tmp:
        figure = run(Path(tmp), samples=args.samples)
    latest = args.out / "latest.json"
    if not latest.is_file():
        print(json.dumps(figure, indent=2))
        return 0
    results = json.loads(latest.read_text())
    results["health"] = figure
    (args.out / "latest.md").write_text(report.markdown(results))
    dump(latest, results)
    print("\n".join(report.summary({"health": figure})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
