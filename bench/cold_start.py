"""Cold start: spawn the server over stdio until its first `tools/list` answer, flux-mcp vs the floor.

The floor is a bare server on the same `mcp` SDK with one trivial tool (bench/floor_server.py). Both
are spawned in alternation, so a burst of noise lands on both about equally, and compared by median.
The goal is judged on the medians, as the issue asks; the ratio of the fastest runs (best of N) is
reported beside it, since on a shared machine it moves much less with the neighbours' load. The CPU
time each child used (user + system, from the kernel) is kept in the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import base_env, floor_command, flux_command, flux_env, p50, p95, running
from .raw import spawn_to_tools_list

GOAL_RATIO = 1.10


def run(workdir: Path, fake_url: str, *, rounds: int, before: Path | None = None) -> dict[str, Any]:
    """`before`: another revision's package (`bench.run --before`), spawned in the same rotation."""
    home = workdir / "cold"
    env_flux = flux_env(home, fake_url)
    env_floor = base_env(home)
    cwd = home / "workspace"
    flux_cmd, floor_cmd = flux_command(), floor_command()
    order = [("flux", flux_cmd, env_flux), ("floor", floor_cmd, env_floor)]
    if before is not None:
        with running(before):
            order.append(("before", flux_command(), flux_env(workdir / "cold-before", fake_url)))
    for _ in range(2):  # warm the page cache and the bytecode caches; not measured
        for _name, cmd, env in order:
            spawn_to_tools_list(cmd, env, cwd)
    runs: dict[str, list[Any]] = {name: [] for name, _, _ in order}
    for i in range(rounds):
        for name, cmd, env in order[i % len(order):] + order[:i % len(order)]:
            runs[name].append(spawn_to_tools_list(cmd, env, cwd))
    wall = {k: [r.seconds for r in v] for k, v in runs.items()}
    cpu = {k: [r.cpu_seconds for r in v if r.cpu_seconds is not None] for k, v in runs.items()}
    ratio = p50(wall["flux"]) / p50(wall["floor"])
    other = {} if before is None else {"before": {
        "flux_p50": p50(wall["before"]), "flux_cpu_p50": p50(cpu["before"]),
        "ratio_p50": p50(wall["before"]) / p50(wall["floor"]),
        "cpu_ratio_p50": p50(cpu["before"]) / p50(cpu["floor"])}}
    return {
        **other,
        "rounds": rounds,
        "flux_s": wall["flux"],
        "floor_s": wall["floor"],
        "flux_cpu_s": cpu["flux"],
        "floor_cpu_s": cpu["floor"],
        "flux_p50": p50(wall["flux"]),
        "flux_p95": p95(wall["flux"]),
        "floor_p50": p50(wall["floor"]),
        "floor_p95": p95(wall["floor"]),
        "flux_cpu_p50": p50(cpu["flux"]),
        "floor_cpu_p50": p50(cpu["floor"]),
        "flux_min": min(wall["flux"]),
        "floor_min": min(wall["floor"]),
        "ratio_p50": ratio,
        "ratio_min": min(wall["flux"]) / min(wall["floor"]),
        "cpu_ratio_p50": p50(cpu["flux"]) / p50(cpu["floor"]),
        "goal": f"flux p50 <= {GOAL_RATIO:.2f} x floor p50",
        "met": ratio <= GOAL_RATIO,
    }
