"""Call overhead: what flux-mcp adds to a call, against the floor measured in the same rounds.

Per transport, every round times (in a shuffled order):
* `check_prediction` on a finished job (answered from the journal: no provider request);
* `generate_image` against the zero-latency fake (done at its first status request), 64x64 result;
* the floor: one raw HTTP request to the fake + one MCP round trip of the floor server's trivial
  `ping` tool. The one request is the call's own: a status request for `check_prediction`; for
  `generate_image` the generation request itself, as flux-mcp sends it by default (flux-schnell in
  sync mode, the image inline in the answer: one request is all a generation needs). The status
  request is cheaper for the fake than a generation (no job to create, no image to encode); the
  difference against that floor is reported too;
* the polled protocol (sync mode off): the three raw requests of a polled Atlas generation (submit,
  status, download) + `ping`, for reference.

With `before` (another revision's package) its two calls join the rounds, and so do the same two calls
on a second server of this revision (its own data folder): the control. Two servers of one package differ
by only the moment and the process (hash seed, memory layout, which core), so "this again / this" is the
noise the before/after ratio carries in this very run.
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx2

from . import sessions
import contextlib

from .common import KEY, FakeProcess, flux_env, p50, p95, running
from .raw import text_of

GOAL_MS = 2.0
MODEL = "black-forest-labs/flux-schnell"


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def run(workdir: Path, fake: FakeProcess, *, rounds: int, warmup: int, before: Path | None = None
        ) -> dict[str, Any]:
    """`before`: another revision's package (`bench.run --before`), its calls timed in the same rounds."""
    home = workdir / "overhead"
    env = flux_env(home, fake.url)
    cwd = home / "workspace"
    logs = home
    fake.serve_image("png", 64, 64, "flat")
    auth = {"Authorization": f"Bearer {KEY}"}
    rng = random.Random(6)
    results: dict[str, Any] = {"rounds": rounds, "warmup": warmup}
    with httpx2.Client(timeout=30, trust_env=False, headers=auth) as http:

        def submit() -> str:
            r = http.post(f"{fake.url}/api/v1/model/generateImage", json={"model": MODEL, "prompt": "raw"})
            return str(r.json()["data"]["id"])

        raw_job = submit()
        http.get(f"{fake.url}/api/v1/model/prediction/{raw_job}")

        def raw_one() -> None:
            http.get(f"{fake.url}/api/v1/model/prediction/{raw_job}").raise_for_status()

        def raw_generation() -> None:
            # The one request a generation needs in the default configuration: flux-schnell on Atlas,
            # sync mode, the image inline in the answer (the same body flux-mcp sends).
            body = {"model": MODEL, "prompt": "raw", "size": "1024*1024", "num_images": 1, "seed": -1,
                    "enable_base64_output": True, "enable_sync_mode": True}
            r = http.post(f"{fake.url}/api/v1/model/generateImage", json=body)
            r.raise_for_status()
            assert r.json()["data"]["outputs"], "the fake answered a sync-mode request without the image"

        def raw_three() -> None:
            job = submit()
            data = http.get(f"{fake.url}/api/v1/model/prediction/{job}").json()["data"]
            http.get(data["outputs"][0]).raise_for_status()

        for transport in sessions.TRANSPORTS:
            errors = 0
            with contextlib.ExitStack() as stack:
                flux = stack.enter_context(sessions.flux(transport, env, cwd, logs))
                floor = stack.enter_context(sessions.floor(transport, home, cwd, logs))
                old = again = None
                if before is not None:
                    with running(before):
                        old_home = workdir / "overhead-before"
                        old = stack.enter_context(sessions.flux(transport, flux_env(old_home, fake.url),
                                                                old_home / "workspace", old_home))
                    again_home = workdir / "overhead-again"
                    again = stack.enter_context(sessions.flux(transport, flux_env(again_home, fake.url),
                                                              again_home / "workspace", again_home))
                first: dict[str, Any] = {}
                old_first: dict[str, Any] = {}
                again_first: dict[str, Any] = {}
                for _ in range(warmup):  # the journal learns this model's (zero) duration, code paths warm up
                    first = flux.call("generate_image", {"prompt": "bench overhead warm-up"})
                    if old is not None and again is not None:
                        old_first = old.call("generate_image", {"prompt": "bench overhead warm-up"})
                        again_first = again.call("generate_image", {"prompt": "bench overhead warm-up"})
                    floor.call("ping", {})
                    raw_one()
                    raw_three()
                    raw_generation()
                pid = first["structuredContent"]["prediction_id"]
                samples: dict[str, list[float]] = {
                    k: [] for k in ("check", "generate", "ping", "raw1", "raw3", "rawgen",
                                    *(() if old is None else ("check_before", "generate_before", "check_again",
                                                              "generate_again")))
                }
                ops = {
                    "check": partial(flux.call, "check_prediction", {"prediction_id": pid}),
                    "generate": partial(flux.call, "generate_image", {"prompt": "bench overhead"}),
                    **({} if old is None or again is None else {
                        "check_before": partial(old.call, "check_prediction", {
                            "prediction_id": old_first["structuredContent"]["prediction_id"]}),
                        "generate_before": partial(old.call, "generate_image", {"prompt": "bench overhead"}),
                        "check_again": partial(again.call, "check_prediction", {
                            "prediction_id": again_first["structuredContent"]["prediction_id"]}),
                        "generate_again": partial(again.call, "generate_image", {"prompt": "bench overhead"})}),
                    "ping": partial(floor.call, "ping", {}),
                    "raw1": raw_one,
                    "raw3": raw_three,
                    "rawgen": raw_generation,
                }
                for _ in range(rounds):
                    order = list(ops)
                    rng.shuffle(order)
                    for name in order:
                        seconds, value = _timed(ops[name])
                        samples[name].append(seconds)
                        if name.startswith(("check", "generate")) and (
                            value.get("isError") or value["structuredContent"]["status"] != "succeeded"
                        ):
                            errors += 1
                typical = flux.call("check_prediction", {"prediction_id": pid})
            floor1 = [a + b for a, b in zip(samples["raw1"], samples["ping"], strict=True)]
            floor3 = [a + b for a, b in zip(samples["raw3"], samples["ping"], strict=True)]
            floorgen = [a + b for a, b in zip(samples["rawgen"], samples["ping"], strict=True)]
            summary: dict[str, Any] = {
                "errors": errors,
                "samples_s": samples,
                "floor_p50": p50(floor1),
                "floor_p95": p95(floor1),
                "floor3_p50": p50(floor3),
                "floor3_p95": p95(floor3),
                "ping_p50": p50(samples["ping"]),
                "raw1_p50": p50(samples["raw1"]),
                "raw3_p50": p50(samples["raw3"]),
                "rawgen_p50": p50(samples["rawgen"]),
                "floorgen_p50": p50(floorgen),
                "floorgen_p95": p95(floorgen),
            }
            for op, base in (("check", floor1), ("generate", floorgen)):
                diff = p50(samples[op]) - p50(base)
                summary[op] = {
                    "p50": p50(samples[op]),
                    "p95": p95(samples[op]),
                    "floor_p50": p50(base),
                    "floor_p95": p95(base),
                    "minus_floor_p50": diff,
                    "minus_floor1_p50": p50(samples[op]) - p50(floor1),
                    "minus_floor3_p50": p50(samples[op]) - p50(floor3),
                    "met": diff * 1000 <= GOAL_MS and errors == 0,
                }
            if before is not None:
                for which in ("before", "again"):
                    summary[which] = {op: {"p50": p50(samples[f"{op}_{which}"]), "p95": p95(samples[f"{op}_{which}"])}
                                      for op in ("check", "generate")}
            results[transport] = summary
            if transport == "stdio":
                results["typical_result"] = {
                    "text": text_of(typical),
                    "structured": typical["structuredContent"],
                    "content_types": [b["type"] for b in typical["content"]],
                }
    results["goal"] = (
        f"p50 within {GOAL_MS:g} ms of the floor (one raw HTTP request + one trivial MCP round trip)"
    )
    return results
