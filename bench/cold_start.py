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

from .common import base_env, floor_command, flux_command, flux_env, p50, p95
from .raw import spawn_to_tools_list

GOAL_RATIO = 1.10


def run(workdir: Path, fake_url: str, *, rounds: int) -> dict[str, Any]:
    home = workdir / "cold"
    env_flux = flux_env(home, fake_url)
    env_floor = base_env(home)
    cwd = home / "workspace"
    flux_cmd, floor_cmd = flux_command(), floor_command()
    for _ in range(2):  # warm the page cache and the bytecode caches; not measured
        spawn_to_tools_list(flux_cmd, env_flux, cwd)
        spawn_to_tools_list(floor_cmd, env_floor, cwd)
    runs: dict[str, list[Any]] = {"flux": [], "floor": []}
    for i in range(rounds):
        order = [("flux", flux_cmd, env_flux), ("floor", floor_cmd, env_floor)]
        for name, cmd, env in order if i % 2 == 0 else order[::-1]:
            runs[name].append(spawn_to_tools_list(cmd, env, cwd))
    wall = {k: [r.seconds for r in v] for k, v in runs.items()}
    cpu = {k: [r.cpu_seconds for r in v if r.cpu_seconds is not None] for k, v in runs.items()}
    ratio = p50(wall["flux"]) / p50(wall["floor"])
    return {
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
