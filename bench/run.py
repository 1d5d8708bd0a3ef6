"""The benchmark suite's one entry point: `python -m bench.run [--quick]` (or `python bench/run.py`).

Runs every figure against the time-based Atlas Cloud fake on 127.0.0.1, each beside a baseline
measured in the same run, prints the summary table and writes bench/results/latest.md and .json.
Nothing is sent anywhere but 127.0.0.1 (atlascloud-mcp is fetched from npm once, for its tool list).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import (
    cold_start,
    completion,
    concurrency,
    context,
    health,
    memory,
    overhead,
    preview,
    report,
    simulate,
)
from bench import common
from bench.common import BENCH, ROOT, FakeProcess, dump

SETTLE_SECONDS = 3.0
"""Pause between figures: one figure's children winding down must not load the next one's timings."""
FIGURES = ("cold_start", "overhead", "health", "concurrency", "memory", "completion", "long_run", "preview", "context")
FULL = {
    "cold_rounds": 20,
    "overhead_rounds": 200,
    "overhead_warmup": 10,
    "calls": 100,
    "lengths": [1.0, 5.0, 20.0, 60.0],
    "warmups": 5,
    "samples": 20,
    "spread": 3.0,
    "preview_repeats": 10,
    "memory_rounds": 3,
    "preview_pairs": 5,
    "concurrency_turns": 3,
}
QUICK = {
    "cold_rounds": 8,
    # As many rounds as the full run: a round costs milliseconds, and at 50 the same-revision control moved by
    # up to 11 % from one quick run to the next, more than the 5 % a --before comparison is judged on.
    "overhead_rounds": 200,
    "overhead_warmup": 10,
    "calls": 100,
    "lengths": [1.0, 5.0, 20.0],
    "warmups": 3,
    "samples": 6,
    "spread": 2.0,
    "preview_repeats": 3,
    "memory_rounds": 2,
    "preview_pairs": 3,
    "concurrency_turns": 2,
}


def _environment() -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or None
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.2f}" for x in load),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mcp": version("mcp"),
        "flux_mcp": version("flux-image-mcp"),
        "commit": commit,
    }


BEFORE_FIGURES = ("cold_start", "overhead", "concurrency", "preview")
"""The figures `--before` also measures on the other revision: the ones its code decides (the others
are this revision's own features, or the fake's). Cold start and call overhead take it into their own
rotation and rounds (the same moments, the same floor); concurrency and previews in alternating turns."""


def _tree(rev: str, into: Path) -> Path:
    """The `src` folder of revision `rev` of this repository, unpacked under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=False, timeout=60)
    if archive.returncode != 0:
        raise SystemExit(f"--before {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    return into / "src"


def _preview_of(source: Path | None, repeats: int) -> dict[str, Any]:
    """The preview times (no end-to-end calls) with `source`'s package (None: the installed one): it times
    functions in-process, so in a child whose import path starts there."""
    code = (f"import json, sys; from bench import preview; "
            f"json.dump(preview.run(repeats={repeats}, end_to_end=False), sys.stdout)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*([str(source)] if source else []), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=600)
    import json

    return json.loads(done.stdout)


def _with(source: Path, run: Any) -> Any:
    """`run()` with the commands it starts running `source`'s package."""
    with common.running(source):
        return run()


def _in_turns(label: str, runs: list[tuple[str, Any]], counts: dict[str, int], started: float,
              pause: float) -> dict[str, list[Any]]:
    """Calls each of `runs` (who, callable) in alternation, in that order, until each was called `counts[who]`
    times; what each returned, by who. On this shared machine a figure moves by 5-30 % between two runs of
    one revision a minute apart, so one run of each after the other measures the moment as much as the code;
    turns taken in alternation see the same machine."""
    done: dict[str, list[Any]] = {who: [] for who, _ in runs}
    for turn in range(max(counts.values(), default=0)):
        for who, run in runs:
            if len(done[who]) < counts[who]:
                time.sleep(pause)
                print(f"[{time.monotonic() - started:5.0f} s] {label}, turn {turn + 1} ({who}) ...", file=sys.stderr,
                      flush=True)
                done[who].append(run())
    return done


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _paired_concurrency(now: dict[str, Any], again_now: Any, other: Any, turns: int, started: float
                        ) -> dict[str, Any]:
    """The concurrency figures of both revisions in `turns` alternating turns each, this revision's first
    being `now` (then the other's, this one's, ...). Each figure is the median of its turns; this revision's
    go into `now` as `paired`, the other's are returned with its last run."""
    done = _in_turns("concurrency", [("before", other), ("now", again_now)], {"before": turns, "now": turns - 1},
                     started, SETTLE_SECONDS)
    now["paired"] = {**_medians([concurrency.figures(r) for r in [now, *done["now"]]]), "turns": turns}
    return {**done["before"][-1], "paired": {**_medians([concurrency.figures(r) for r in done["before"]]),
                                             "turns": turns}}


def _paired_previews(now: dict[str, Any], before: Path, p: dict[str, Any], started: float) -> dict[str, Any]:
    """The preview ratios of both revisions, each measured in `preview_pairs` children taken in alternating
    turns (this revision's, then the other's). Each row's ratio is the median of its children's; this
    revision's go into `now` as `paired_ratio`."""
    turns = p["preview_pairs"]
    done = _in_turns("preview", [("now", lambda: _preview_of(None, p["preview_repeats"])),
                                 ("before", lambda: _preview_of(before, p["preview_repeats"]))],
                     {"now": turns, "before": turns}, started, SETTLE_SECONDS / 3)

    def medians(who: str) -> list[float]:
        return [statistics.median(run["rows"][i]["ratio"] for run in done[who]) for i in range(len(now["rows"]))]

    for row, ratio in zip(now["rows"], medians("now"), strict=True):
        row["paired_ratio"] = ratio
    rows = [{"format": row["format"], "side": row["side"], "ratio": ratio}
            for row, ratio in zip(now["rows"], medians("before"), strict=True)]
    return {"rows": rows, "turns": turns}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short run (about 2 minutes): fewer samples, no 60 s jobs"
    )
    parser.add_argument("--only", nargs="+", choices=FIGURES, help="run only these figures")
    parser.add_argument(
        "--no-npm", action="store_true", help="do not install atlascloud-mcp from npm if missing"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="where latest.md/.json go")
    parser.add_argument(
        "--before", metavar="REV",
        help="also measure git revision REV (e.g. the one before a change) right after each of the figures "
        f"{', '.join(BEFORE_FIGURES)}, and report this revision's figures against it",
    )
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    wanted = set(args.only or FIGURES)
    command = "python -m bench.run" + (" --quick" if args.quick else "") + (f" --before {args.before}" if args.before
                                                                              else "")
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "parameters": p,
        "environment": _environment(),
    }

    first = True

    def step(name: str) -> bool:
        nonlocal first
        if name not in wanted:
            return False
        if not first:
            time.sleep(SETTLE_SECONDS)  # the previous figure's processes exit and the machine settles
        first = False
        print(f"[{time.monotonic() - started:5.0f} s] {name} ...", file=sys.stderr, flush=True)
        return True

    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        workdir = Path(tmp)
        before = _tree(args.before, workdir / "before") if args.before else None
        other = workdir / "before-run"  # its own data folders: an older revision cannot open a newer journal
        other.mkdir()
        if before is not None:
            results["before"] = {"rev": args.before}

        with FakeProcess(workdir) as fake:
            if step("cold_start"):
                results["cold_start"] = cold_start.run(workdir, fake.url, rounds=p["cold_rounds"], before=before)
            if step("overhead"):
                results["overhead"] = overhead.run(
                    workdir, fake, rounds=p["overhead_rounds"], warmup=p["overhead_warmup"], before=before
                )
            if step("health"):
                results["health"] = health.run(workdir)
            if step("concurrency"):
                results["concurrency"] = concurrency.run(workdir, fake, calls=p["calls"])
                if before is not None:
                    results["before"]["concurrency"] = _paired_concurrency(
                        results["concurrency"], lambda: concurrency.run(workdir, fake, calls=p["calls"]),
                        lambda: _with(before, lambda: concurrency.run(other, fake, calls=p["calls"])),
                        p["concurrency_turns"], started)
            if step("memory"):
                results["memory"] = memory.run(workdir, fake, rounds=p["memory_rounds"])
            if step("completion"):
                results["completion"] = completion.run(
                    workdir,
                    fake,
                    lengths=p["lengths"],
                    warmups=p["warmups"],
                    samples=p["samples"],
                    spread=p["spread"],
                )
            if step("long_run"):
                results["long_run"] = simulate.run(p["lengths"])
            if step("preview"):
                results["preview"] = preview.run(repeats=p["preview_repeats"])
                if before is not None:
                    results["before"]["preview"] = _paired_previews(results["preview"], before, p, started)
            if step("context"):
                typical = (results.get("overhead") or {}).get("typical_result")
                results["context"] = context.run(workdir, fake.url, typical, install=not args.no_npm)
    results["seconds"] = time.monotonic() - started
    text = report.markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text)
    dump(args.out / "latest.json", results)
    print(text)
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
