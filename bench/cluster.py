"""The kill benchmark: `python -m bench.cluster [--quick]` (or `python bench/cluster.py`).

Three `flux-mcp serve --transport streamable-http` replicas (shared mode: stateless streamable HTTP, the
journal on PostgreSQL, images in an S3 bucket) behind haproxy running deploy/haproxy.cfg, PostgreSQL
(fsync and synchronous commits on), moto's S3 server in its own process and the time-keeping Atlas Cloud
fake (bench/fake.py: 5 s jobs, a submit's answer 15-45 ms after the job exists, polled mode:
`ATLASCLOUD_SYNC_MODE=off`), all on loopback (tests/cluster/replicas.py starts them).

Each run sends N `generate_image` calls spread evenly over a few seconds, each with a nonce in its prompt
(the fake counts accepted submits per nonce) and an `idempotency_key` (or none: the key-less runs).
A killed run SIGKILLs one replica mid-run; a client whose call is cut (haproxy's 502, a broken stream)
re-issues the same call at once, same key. A call answered `starting`/`processing` is followed with
`check_prediction` until final. After each run it checks:

* double submissions: accepted submits per nonce beyond the first (goal 0);
* lost predictions: nonces the provider accepted whose call did not end `succeeded` with its images in
  the bucket, nor `unknown` (goal 0); also paid jobs no journal row holds;
* `unknown` against the killed replica's in-flight calls (goal <= 1 %);
* completion time of the cut calls after the kill, against what was left of their job plus the lease
  plus 1 s;
* p50/p95 of the calls answered by the surviving replicas against the no-kill run's (goal within 10 %);
* no row left pending, and presigned links that download.

And, in the same run, the per-call overhead of PostgreSQL + S3 against SQLite + the data folder: one
server of each on the zero-latency fake with held submits, `generate_image` and `check_prediction` interleaved (bare
JSON-RPC clients, as bench/overhead.py), goal <= +1.5 ms p50 for `generate_image`.

Writes bench/results/cluster.md and cluster.json (cluster-quick.* with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/cluster.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import anyio
import httpx2

from bench.common import (BENCH, KEY, ROOT, FakeJob, FakeProcess, dump, flux_env, http_server, p50, p95, percentile,
                          secs, verdict)
from bench.raw import RawHttp
from tests.cluster.replicas import Cluster, Cut, MotoProcess, call_tool, flux_command, list_keys, nonce_of
from tests.cluster_env import Postgres

TOKEN = secrets.token_urlsafe(24)
"""The bench user's bearer token, made for this run (the replicas it guards live only as long as the run)."""


def team(users: int) -> dict[str, str]:
    """The team's users and their bearer tokens (test values); call i is made by user i mod `users`."""
    return {f"user{u:02d}": f"{TOKEN}-{u:02d}" for u in range(users)}
PENDING = ("starting", "processing")
FULL: dict[str, Any] = {
    "calls": 500, "killed_runs": 5, "keyless_runs": 1, "spread_s": 10.0, "job_s": 5.0, "kill_at_s": 2.5,
    "lease_s": 5.0, "submit_delay_s": [0.015, 0.045], "overhead_rounds": 100, "overhead_warmup": 10,
    "presigned_checks": 50, "users": 10, "call_limit_s": 150.0, "ramp": [25, 50, 100, 150, 200], "ramp_step_s": 4.0,
    "roll_runs": 3,
}
QUICK: dict[str, Any] = {
    **FULL, "calls": 100, "killed_runs": 1, "keyless_runs": 1, "spread_s": 4.0, "kill_at_s": 2.0,
    "overhead_rounds": 40, "overhead_warmup": 5, "presigned_checks": 10, "ramp": [50, 150], "ramp_step_s": 2.0,
    "roll_runs": 1,
}
GOAL_OVERHEAD_MS = 1.5
GOAL_UNKNOWN = 0.01
GOAL_LATENCY = 0.10
MAX_ATTEMPTS = 40


# --- one logical call ---------------------------------------------------------------------------------

@dataclass
class Attempt:
    tool: str
    start: float
    end: float
    replica: str | None
    cut: str | None = None


@dataclass
class Call:
    index: int
    nonce: str
    key: str | None
    token: str = TOKEN
    start: float = 0.0
    end: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    status: str | None = None
    prediction_id: str | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def cut(self) -> bool:
        return any(a.cut for a in self.attempts)

    @property
    def first(self) -> Attempt | None:
        return self.attempts[0] if self.attempts else None


async def _attempt(call: Call, http: httpx2.AsyncClient, url: str, tool: str, args: dict[str, Any]) -> Any:
    """One tool call, re-issued as it was whenever it is cut (the same arguments, so the same key)."""
    while True:
        t0 = time.monotonic()
        try:
            answer = await call_tool(http, url, call.token, tool, args)
        except Cut as exc:
            call.attempts.append(Attempt(tool, t0, time.monotonic(), None, str(exc)))
            if len(call.attempts) >= MAX_ATTEMPTS:
                raise RuntimeError(f"cut {MAX_ATTEMPTS} times") from None
            await anyio.sleep(0.05)
            continue
        call.attempts.append(Attempt(tool, t0, time.monotonic(), answer.replica))
        return answer.result


async def run_call(call: Call, http: httpx2.AsyncClient, url: str, prompt: str) -> None:
    args: dict[str, Any] = {"prompt": prompt}
    if call.key:
        args["idempotency_key"] = call.key
    call.start = time.monotonic()
    try:
        result = await _attempt(call, http, url, "generate_image", args)
        while True:
            data = result.get("structuredContent") or {}
            if result.get("isError"):
                call.error = " ".join(b.get("text", "") for b in result.get("content", []))[:300]
                call.status = data.get("status")
                break
            call.status, call.prediction_id = data.get("status"), data.get("prediction_id")
            call.images = list(data.get("images") or [])
            if call.status not in PENDING or not call.prediction_id:
                break
            result = await _attempt(call, http, url, "check_prediction", {"prediction_id": call.prediction_id})
    except Exception as exc:  # reported per call; the run goes on
        call.error = f"{type(exc).__name__}: {exc}"[:300]
    call.end = time.monotonic()


# --- one run --------------------------------------------------------------------------------------------

async def _drive(cluster: Cluster, tag: str, p: dict[str, Any], *, keyed: bool, victim: str | None,
                 prompt_of: Any, roll: list[str] | None = None,
                 rate_steps: list[tuple[float, float]] | None = None) -> tuple[list[Call], float | None, list[dict[str, Any]]]:
    """Runs one load: `p["calls"]` spread evenly over `p["spread_s"]` (or, with `rate_steps`, (calls/s,
    seconds) steps one after the other); `victim` is SIGKILLed `p["kill_at_s"]` in; `roll` names replicas
    SIGTERMed in turn from then on, each restarted (and routed to again) before the next. Returns the calls,
    the kill's moment and the rolling restart's events."""
    tokens = list(team(p["users"]).values())
    offsets: list[float] = []
    if rate_steps:
        t = 0.0
        for rate, seconds in rate_steps:
            offsets += [t + k / rate for k in range(int(rate * seconds))]
            t += seconds
    else:
        gap = p["spread_s"] / max(p["calls"], 1)
        offsets = [i * gap for i in range(p["calls"])]
    calls = [Call(i, f"{tag}-{i:04d}-{uuid.uuid4().hex[:6]}", f"{tag}-key-{i:04d}" if keyed else None,
                  tokens[i % len(tokens)]) for i in range(len(offsets))]
    killed: list[float] = []
    events: list[dict[str, Any]] = []
    limits = httpx2.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(180, connect=10), limits=limits, trust_env=False) as http:
        start = time.monotonic()

        async def launch(c: Call) -> None:
            await anyio.sleep(max(0.0, start + offsets[c.index] - time.monotonic()))
            await run_call(c, http, cluster.url, prompt_of(c))

        async def roll_all() -> None:
            assert roll is not None
            await anyio.sleep(max(0.0, start + p["kill_at_s"] - time.monotonic()))
            for name in roll:
                event: dict[str, Any] = {"replica": name, "sigterm": cluster.terminate(name)}
                event["exit_status"] = await anyio.to_thread.run_sync(cluster.stopped, name)
                event["exited"] = time.monotonic()
                await anyio.to_thread.run_sync(cluster.restart, name)
                event["ready"] = time.monotonic()
                await anyio.to_thread.run_sync(lambda: cluster.wait_routed_to_all(limit=60))
                event["routed"] = time.monotonic()
                events.append(event)

        async def kill() -> None:
            assert victim is not None
            await anyio.sleep(max(0.0, start + p["kill_at_s"] - time.monotonic()))
            killed.append(cluster.kill(victim))

        with anyio.move_on_after(p["spread_s"] + p["call_limit_s"] + (60 * len(roll) if roll else 0)):
            async with anyio.create_task_group() as tg:
                for c in calls:
                    tg.start_soon(launch, c)
                if victim:
                    tg.start_soon(kill)
                if roll:
                    tg.start_soon(roll_all)
    for c in calls:
        if c.end is None:  # still unanswered at the limit: reported as such, with what it saw last
            c.error = (f"not finished within {p['spread_s'] + p['call_limit_s']:g} s (last status {c.status}, "
                       f"{len(c.attempts)} attempts, last {c.attempts[-1].tool if c.attempts else '-'} "
                       f"{'cut: ' + str(c.attempts[-1].cut) if c.attempts and c.attempts[-1].cut else ''})")
    return calls, (killed[0] if killed else None), events


def _analyse(calls: list[Call], jobs: dict[str, FakeJob], rows: list[dict[str, Any]], keys: set[str],
             bucket: str, kill_at: float | None, victim: str | None, p: dict[str, Any],
             presigned: dict[str, int]) -> dict[str, Any]:
    by_nonce = {c.nonce: c for c in calls}
    mine = [j for j in jobs.values() if j.nonce in by_nonce]
    submits = Counter(str(j.nonce) for j in mine)
    doubles = sum(n - 1 for n in submits.values() if n > 1)
    row_status = {r["id"]: r["status"] for r in rows}

    def delivered(c: Call) -> bool:
        if c.status != "succeeded" or not c.images:
            return False
        paths = [str(i.get("path") or "") for i in c.images]
        return all(x.startswith(f"s3://{bucket}/") and x.removeprefix(f"s3://{bucket}/") in keys for x in paths)

    def stored(paths: list[str]) -> bool:
        return bool(paths) and all(x.startswith(f"s3://{bucket}/") and x.removeprefix(f"s3://{bucket}/") in keys
                                   for x in paths)

    # What the journal holds per call (a call cut off by the bench's own limit may still have been finished).
    row_of: dict[str, dict[str, Any]] = {}
    for r in rows:
        prompt = str((r.get("request") or {}).get("prompt", ""))
        if (n := nonce_of(prompt)) is not None:
            row_of[n] = r

    def in_journal(n: str) -> bool:
        r = row_of.get(n)
        return r is not None and (r["status"] == "unknown" or (r["status"] == "succeeded" and stored(
            [str(i.get("path") or "") for i in r.get("images") or []])))

    lost = [str(n) for n in submits if not (delivered(by_nonce[n]) or by_nonce[n].status == "unknown")
            and not in_journal(n)]
    late = [str(n) for n in submits if not (delivered(by_nonce[n]) or by_nonce[n].status == "unknown")
            and in_journal(n)]
    # A paid job that neither a succeeded row holds nor its call reports (as its result, or as `unknown`): e.g.
    # the first of a double submission, paid for and never delivered.
    orphaned = [j.id for j in mine if row_status.get(f"atlascloud:{j.id}") != "succeeded"
                and by_nonce[str(j.nonce)].prediction_id != f"atlascloud:{j.id}"
                and by_nonce[str(j.nonce)].status != "unknown"]
    statuses = Counter(c.status or ("error" if c.error else "none") for c in calls)
    cut = [c for c in calls if c.first is not None and c.first.cut]
    # In flight on the killed replica at the kill: cut calls whose first attempt began before the kill.
    in_flight = [c for c in cut if kill_at is not None and c.first is not None and c.first.start <= kill_at]
    refused = [c for c in cut if c not in in_flight]
    unknown = [c for c in calls if c.status == "unknown"]
    submits_in_flight = [j for j in mine if kill_at is not None and j.submitted <= kill_at
                         and (j.answered is None or j.answered >= kill_at) and by_nonce[str(j.nonce)] in in_flight]
    survivors = [c for c in calls if not c.cut and c.end is not None and c.first is not None
                 and c.first.replica not in (None, victim)]
    latency = [c.end - c.start for c in survivors if c.end is not None]
    extra: list[float] = []
    parts: list[dict[str, float]] = []
    for c in in_flight:
        job = jobs.get(str(c.prediction_id).removeprefix("atlascloud:"))
        if c.end is None or kill_at is None or job is None or job.complete_at is None:
            continue
        remaining = max(0.0, job.complete_at - kill_at)
        extra.append((c.end - kill_at) - remaining)
        # Where the time went: the kill to a survivor's first status request (the lease's lapse and a claim, or
        # a re-issue that found the job), that request to the one that found it done (if it was not yet), and
        # that one to the call's answer (keeping the image, the final write, the wake-up, the answer's way back).
        taker = next((t for t, via in job.poll_log if t >= kill_at and via not in (None, victim)), None)
        if taker is not None and job.done_seen_at is not None:
            parts.append({"extra": extra[-1], "remaining": remaining, "takeover": taker - kill_at,
                          "first_reissue": next((a.start - kill_at for a in c.attempts[1:]), math.nan),
                          "poll_lag": job.done_seen_at - max(taker, job.complete_at),
                          "delivery": c.end - job.done_seen_at})
    pending_rows = [r["id"] for r in rows if r["status"] in (*PENDING, "submitting")]
    reasons = Counter(str(a.cut).split(":")[0] for c in calls for a in c.attempts if a.cut)
    samples: dict[str, str] = {}
    for c in calls:
        for a in c.attempts:
            if a.cut:
                samples.setdefault(str(a.cut).split(":")[0], str(a.cut))
    return {
        "calls": len(calls),
        "statuses": dict(statuses),
        "errors": [c.error for c in calls if c.error][:10],
        "error_kinds": dict(Counter(re.sub(r"[0-9a-f]{8,}", "…", str(c.error))[:90] for c in calls if c.error)),
        "provider_submits": sum(submits.values()),
        "double_submissions": doubles,
        "lost": len(lost),
        "lost_nonces": lost[:10],
        "finished_but_not_answered": len(late),
        "unfinished_calls": sum(1 for c in calls if c.end is None),
        "paid_not_delivered": len(orphaned),
        "unknown": len(unknown),
        "unknown_reached_provider": sum(1 for c in unknown if submits[c.nonce] > 0),
        # For each unknown job the provider created: when it sent the submit's answer, against the kill (negative:
        # before it; the replica died between reading the answer and committing it).
        "unknown_answered_vs_kill_s": [round(j.answered - kill_at, 4) for j in mine if kill_at is not None
                                       and j.answered is not None and by_nonce[str(j.nonce)].status == "unknown"],
        "killed_in_flight": len(in_flight),
        "killed_submits_in_flight": len(submits_in_flight),
        "cut_after_kill": len(refused),
        "unknown_share": len(unknown) / len(in_flight) if in_flight else 0.0,
        "cut_reasons": dict(reasons),
        "cut_examples": samples,
        "reissues": sum(max(0, sum(1 for a in c.attempts if a.tool == "generate_image") - 1) for c in calls),
        "checks": sum(1 for c in calls for a in c.attempts if a.tool == "check_prediction"),
        "pending_rows": len(pending_rows),
        "rows": len(rows),
        "cut_parts_s": {k: {"p50": p50([x[k] for x in parts]), "max": max((x[k] for x in parts), default=math.nan)}
                        for k in ("takeover", "poll_lag", "delivery", "first_reissue")} | {
                            "worst": max(parts, key=lambda x: x["extra"], default=None), "n": len(parts)},
        "cut_extra_s": {"p50": p50(extra), "p99": percentile(extra, 99), "max": max(extra, default=math.nan),
                        "n": len(extra)},
        "cut_goal_s": p["lease_s"] + 1.0,
        "survivor_latency_s": {"p50": p50(latency), "p95": p95(latency), "n": len(latency)},
        "latency_s": {"p50": p50([c.end - c.start for c in calls if c.end]),
                      "p95": p95([c.end - c.start for c in calls if c.end])},
        "status_requests_per_job": (sum(j.polls for j in mine) / len(mine)) if mine else math.nan,
        "presigned": presigned,
        "wall_s": (max(c.end for c in calls if c.end) - min(c.start for c in calls)) if calls else 0.0,
    }


def _presigned(calls: list[Call], n: int, rng: random.Random) -> dict[str, int]:
    links = [str(i["url"]) for c in calls if c.status == "succeeded" for i in c.images if i.get("url")]
    sample = rng.sample(links, min(n, len(links)))
    ok = 0
    with httpx2.Client(timeout=30, trust_env=False) as http:
        for link in sample:
            r = http.get(link)
            ok += r.status_code == 200 and r.content.startswith(b"\x89PNG")
    return {"checked": len(sample), "ok": ok}


def _analyse_roll(calls: list[Call], jobs: dict[str, FakeJob], events: list[dict[str, Any]], p: dict[str, Any],
                  start: float) -> dict[str, Any]:
    """Scenario D: what each SIGTERM did to the calls in flight on its replica, to new calls, and how soon another
    replica asked the provider about each job the stopping one handed over."""
    by_nonce = {c.nonce: c for c in calls}
    out: list[dict[str, Any]] = []
    for e in events:
        name, sig = e["replica"], e["sigterm"]
        # Attempts under way at the SIGTERM: answered by the stopping replica, or cut (a cut attempt started before
        # the signal could only have been on it: the others ran on).
        under_way = [(c, a) for c in calls for a in c.attempts if a.start <= sig <= a.end
                     and (a.replica == name or a.cut)]
        answered = [(c, a) for c, a in under_way if a.replica == name and not a.cut]
        cut = [(c, a) for c, a in under_way if a.cut]
        refused = [c for c in calls if c.error and "shutting down" in c.error and c.attempts
                   and sig <= c.attempts[-1].start <= e["exited"]]
        # Jobs it submitted that were not yet final when it got the signal, and who asked about them next.
        mine = [j for j in jobs.values() if j.via == name and j.nonce in by_nonce
                and (j.done_seen_at is None or j.done_seen_at > sig)]
        handed, by_self = [], 0
        for j in mine:
            other = next((t for t, via in j.poll_log if t >= sig and via not in (None, name)), None)
            if other is not None:
                handed.append(other - sig)
            elif any(t >= sig and via == name for t, via in j.poll_log):
                by_self += 1
        out.append({
            "replica": name, "sigterm_at_s": sig - start, "exit_status": e["exit_status"],
            "stop_s": e["exited"] - sig, "restart_s": e["ready"] - e["exited"], "routed_s": e["routed"] - e["ready"],
            "under_way": len(under_way), "answered_while_stopping": len(answered), "cut_in_flight": len(cut),
            "answered_s": {"p50": p50([a.end - sig for _, a in answered]),
                           "max": max((a.end - sig for _, a in answered), default=math.nan)},
            "pending_jobs": len(mine), "finished_by_itself": by_self, "handed_over": len(handed),
            "handover_s": {"p50": p50(handed), "max": max(handed, default=math.nan)},
            "refused": len(refused),
        })
    sigs = [e["sigterm"] for e in events]
    # A cut attempt that began after a SIGTERM (and after the previous restart) reached no call in flight: it is
    # a call the stop or the balancer cut that a graceful stop should have let through.
    beyond = [a for c in calls for a in c.attempts if a.cut and sigs and not any(
        a.start <= s <= a.end for s in sigs)]
    reasons = Counter(str(a.cut).split(":")[0] for a in beyond)
    return {"events": out, "cut_beyond_in_flight": len(beyond), "cut_beyond_reasons": dict(reasons),
            "cut_in_flight": sum(e["cut_in_flight"] for e in out),
            "handover_max_s": max((e["handover_s"]["max"] for e in out if e["handed_over"]), default=math.nan),
            "lease_s": p["lease_s"]}


def one_run(cluster: Cluster, fake: FakeProcess, pg: Postgres, database: str, bucket: str, tag: str,
            p: dict[str, Any], *, keyed: bool, victim: str | None, rng: random.Random,
            roll: list[str] | None = None, rate_steps: list[tuple[float, float]] | None = None,
            stats: Any = None) -> dict[str, Any]:
    def prompt_of(c: Call) -> str:
        long = p.get("long_every") and c.index % p["long_every"] == 0  # outlives a stopping replica's grace
        return f"bench cluster call {c.index} [duration={p['job_s'] * (3 if long else 1):.4f}] [nonce={c.nonce}]"

    load_before = os.getloadavg()
    if stats is not None:
        stats.reset()
    calls, kill_at, events = anyio.run(lambda: _drive(cluster, tag, p, keyed=keyed, victim=victim,
                                                      prompt_of=prompt_of, roll=roll, rate_steps=rate_steps))
    statements = stats.read(database) if stats is not None else None
    jobs = fake.jobs()
    rows = cluster.rows(pg.psql, database, f"request->>'prompt' LIKE '%[nonce={tag}-%'")
    all_pending = cluster.rows(pg.psql, database, "status IN ('starting', 'processing', 'submitting')")
    keys = set(list_keys(cluster.s3_env["AWS_ENDPOINT_URL"], bucket))
    result = _analyse(calls, jobs, rows, keys, bucket, kill_at, victim, p,
                      _presigned(calls, p["presigned_checks"], rng))
    result.update({"tag": tag, "keyed": keyed, "victim": victim, "kill_at_s":
                   (kill_at - min(c.start for c in calls)) if kill_at else None,
                   "pending_rows_anywhere": len(all_pending), "load_before": [round(x, 2) for x in load_before],
                   "load_after": [round(x, 2) for x in os.getloadavg()], "replicas": len(cluster.replicas)})
    if roll:
        result["roll"] = _analyse_roll(calls, jobs, events, p, min(c.start for c in calls))
    if statements is not None:
        result["statements"] = _per_job(statements, result["provider_submits"])
    if rate_steps:
        result["steps"] = _steps(calls, rate_steps)
    return result


def ramp(cluster: Cluster, fake: FakeProcess, pg: Postgres, database: str, bucket: str, tag: str,
         p: dict[str, Any], rng: random.Random, say: Any) -> dict[str, Any]:
    """Scenario A's ramp: one run per rate (`p["ramp"]` calls/s, each for `p["ramp_step_s"]`), no kill, until
    the call p95 passes twice the job (the knee: that rate) or the rates run out."""
    steps: list[dict[str, Any]] = []
    knee = None
    for rate in p["ramp"]:
        run = one_run(cluster, fake, pg, database, bucket, f"{tag}r{rate:g}", {**p, "presigned_checks": 0}, keyed=True,
                      victim=None, rng=rng, rate_steps=[(rate, p["ramp_step_s"])])
        step = {**run["steps"][0], "status_requests_per_job": run["status_requests_per_job"],
                "double_submissions": run["double_submissions"], "statuses": run["statuses"],
                "load_after": run["load_after"]}
        steps.append(step)
        say(f"  {tag} {rate:g} calls/s: p50 {step['p50']:.2f} s, p95 {step['p95']:.2f} s, {run['statuses']}")
        if step["p95"] > 2 * p["job_s"] or step["errors"]:
            knee = rate
            break
    return {"replicas": len(cluster.replicas), "steps": steps, "knee": knee, "step_s": p["ramp_step_s"]}


# --- statements per job: pg_stat_statements -------------------------------------------------------------

_KINDS = (("transaction control (BEGIN/COMMIT)", re.compile(r"^(BEGIN|COMMIT|ROLLBACK)\b", re.I)),
          ("readiness checks (/readyz)", re.compile(r"^SELECT \$?1$")),
          ("LISTEN", re.compile(r"^LISTEN\b")),
          ("heartbeats", re.compile(r"SET lease_until = .* WHERE lease_owner = \$\d+ AND status IN")),
          # (pg_stat_statements shows the literal as a parameter: $n)
          ("reconciler: lapsed intents", re.compile(r"WHERE status = ('submitting'|\$\d+) AND lease_until <")),
          ("reconciler: lapsed leases", re.compile(r"^WITH due AS")),
          ("connection set-up", re.compile(r"^(SET|SHOW|SELECT set_config|SELECT pg_catalog)", re.I)))
BACKGROUND = {k for k, _ in _KINDS if k not in ("transaction control (BEGIN/COMMIT)",)}
"""Statements no job causes: each replica's periodic ones (the heartbeat every lease/4, the reconciler's pass
every 0.3 s, haproxy's readiness check every 2 s, the LISTEN connection)."""


class Statements:
    """Counts the statements the replicas send, by kind, with PostgreSQL's pg_stat_statements (loaded at the
    server's start: the bench restarts its PostgreSQL once with it). Counted per database, so the other runs'
    servers and this bench's own psql reads (json_agg, pg_stat_statements) are left out."""

    def __init__(self, pg: Postgres):
        from tests.cluster_env import _as_postgres

        self.pg = pg
        pg.psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        _as_postgres([str(pg.bin / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.folder / "log"), "-w", "-t", "60",
                      "-m", "fast", "restart"])  # (with its log file: the server must not hold our pipes)
        pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def reset(self) -> None:
        self.pg.psql("SELECT pg_stat_statements_reset()")

    def read(self, database: str) -> dict[str, int]:
        sql = ("SELECT coalesce(json_object_agg(query, calls), '{}') FROM (SELECT query, sum(calls) AS calls "
               "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = "
               f"'{database}') AND query NOT LIKE '%pg_stat_statements%' AND query NOT LIKE '%json_agg%' "
               "GROUP BY query) q")
        return {str(k): int(v) for k, v in json.loads(self.pg.psql(sql) or "{}").items()}


def _kind(query: str) -> str:
    q = " ".join(query.split())
    return next((k for k, rx in _KINDS if rx.search(q)), "job")


def _per_job(counts: dict[str, int], jobs: int) -> dict[str, Any]:
    """Statements per job: those of the jobs' own calls (intent, record, final state, lookups), transaction control
    apart, and the periodic ones no job causes, each over the run's jobs."""
    kinds: Counter[str] = Counter()
    top: Counter[str] = Counter()
    for query, n in counts.items():
        kind = _kind(query)
        kinds[kind] += n
        if kind == "job":
            top[" ".join(query.split())[:110]] += n
    per = (lambda n: n / jobs) if jobs else (lambda n: math.nan)
    job = kinds["job"]
    return {"jobs": jobs, "job_statements": job, "per_job": per(job),
            "transactions_per_job": per(kinds["transaction control (BEGIN/COMMIT)"]) / 2,
            "background": {k: kinds[k] for k in BACKGROUND if kinds[k]},
            "background_per_job": per(sum(kinds[k] for k in BACKGROUND)),
            "top": [{"query": q, "per_job": per(n)} for q, n in top.most_common(8)]}


def _steps(calls: list[Call], rate_steps: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per step of a ramp: its rate and the p50/p95 of its calls (each call counted in the step it started in)."""
    out, first = [], 0
    for rate, seconds in rate_steps:
        n = int(rate * seconds)
        mine = [c.end - c.start for c in calls[first:first + n] if c.end is not None and not c.error]
        errors = sum(1 for c in calls[first:first + n] if c.error)
        out.append({"rate": rate, "calls": n, "p50": p50(mine), "p95": p95(mine), "errors": errors})
        first += n
    return out


# --- overhead: PostgreSQL + S3 against SQLite + folder ----------------------------------------------------

BACKENDS = {"pg": "PostgreSQL (durable commits) + S3", "pgasync": "PostgreSQL (synchronous_commit=off) + S3",
            "pgfolder": "PostgreSQL (durable commits) + folder", "sqlite": "SQLite + folder"}
"""The servers timed: the shared backends, the PostgreSQL journal alone (the design note's "the Postgres journal
adds <= 1.5 ms"), and the single-server default every difference is taken against."""


def _shared_session(url: str) -> RawHttp:
    """A bare session on a shared-mode replica (it wants the token on every request)."""
    session = RawHttp(url)
    session.http.headers["Authorization"] = f"Bearer {TOKEN}"
    session.initialize()
    return session


def overhead(workdir: Path, fake: FakeProcess, pg: Postgres, s3: MotoProcess, p: dict[str, Any]) -> dict[str, Any]:
    """One server per backend on the zero-latency fake, the same calls interleaved. The SQLite journal commits
    without waiting for the disk (WAL, synchronous=NORMAL), so PostgreSQL runs twice: durable (each commit
    flushed, the production setting) and with synchronous_commit=off (SQLite's durability)."""
    fake.configure(submit_delay=(0.0, 0.0))
    fake.serve_image("png", 64, 64, "flat")
    durable, relaxed = pg.create_database("overhead"), pg.create_database("overhead_async")
    alone = pg.create_database("overhead_folder")
    pg.psql(f'ALTER DATABASE "{relaxed}" SET synchronous_commit = off')
    bucket = s3.create_bucket()
    home = workdir / "overhead-sqlite"
    env = flux_env(home, fake.url)  # Atlas Cloud's default: a held submit (one request, the image inline)
    shared_env = {"FLUX_MCP_LOG_LEVEL": "WARNING", "ATLASCLOUD_SYNC_MODE": "auto"}
    rng = random.Random(11)
    samples: dict[str, list[float]] = {f"{b}_{op}": [] for b in BACKENDS for op in ("generate", "check", "ping")}
    samples.update({f"floor_{op}": [] for op in ("commit", "put", "get")})
    errors = 0
    with (
        Cluster(workdir / "overhead-pg", pg.url(durable), s3.env(bucket), fake.url, KEY, {"bench": TOKEN},
                size=1, balancer=False, env=shared_env) as on_durable,
        Cluster(workdir / "overhead-pgasync", pg.url(relaxed), s3.env(bucket), fake.url, KEY, {"bench": TOKEN},
                size=1, balancer=False, env=shared_env) as on_relaxed,
        Cluster(workdir / "overhead-pgfolder", pg.url(alone), {}, fake.url, KEY, {"bench": TOKEN},
                size=1, balancer=False, env=shared_env) as on_folder,
        http_server([*flux_command(), "serve", "--transport", "streamable-http"], env, home / "workspace",
                    home / "server.log") as (sqlite_url, _),
        RawHttp(f"{sqlite_url}/mcp") as on_sqlite,
        contextlib.ExitStack() as stack,
    ):
        sessions: dict[str, RawHttp] = {"sqlite": on_sqlite}
        for name, server in (("pg", on_durable), ("pgasync", on_relaxed), ("pgfolder", on_folder)):
            sessions[name] = _shared_session(f"{server.replicas[0].url}/mcp")
            stack.callback(sessions[name].http.close)
        pids: dict[str, str] = {}
        for _ in range(p["overhead_warmup"]):  # each journal learns the (zero) job length; code paths warm up
            for name, session in sessions.items():
                pids[name] = session.call("generate_image", {"prompt": "bench overhead warm-up"})[
                    "structuredContent"]["prediction_id"]
        floors = _Floors(pg.url(durable), s3, bucket, fake)
        ops: list[tuple[str, str]] = [(b, op) for b in sessions for op in ("generate", "check", "ping")]
        ops += [("floor", op) for op in ("commit", "put", "get")]
        for _ in range(p["overhead_rounds"]):
            rng.shuffle(ops)
            for backend, op in ops:
                t0 = time.perf_counter()
                if backend == "floor":
                    getattr(floors, op)()
                    samples[f"floor_{op}"].append(time.perf_counter() - t0)
                    continue
                if op == "ping":  # the transport alone: one JSON-RPC round trip, no tool
                    sessions[backend].request("ping")
                    samples[f"{backend}_ping"].append(time.perf_counter() - t0)
                    continue
                args = {"prompt": "bench overhead"} if op == "generate" else {"prediction_id": pids[backend]}
                result = sessions[backend].call("generate_image" if op == "generate" else "check_prediction", args)
                samples[f"{backend}_{op}"].append(time.perf_counter() - t0)
                if result.get("isError") or (result.get("structuredContent") or {}).get("status") != "succeeded":
                    errors += 1
        floors.close()
    out: dict[str, Any] = {"rounds": p["overhead_rounds"], "errors": errors, "samples_s": samples}
    for op in ("generate", "check", "ping"):
        base = p50(samples[f"sqlite_{op}"])
        out[op] = {b: {"p50": p50(samples[f"{b}_{op}"]), "p95": p95(samples[f"{b}_{op}"]),
                       "diff_p50": p50(samples[f"{b}_{op}"]) - base} for b in BACKENDS}
    out["floors"] = {op: {"p50": p50(samples[f"floor_{op}"]), "p95": p95(samples[f"floor_{op}"])}
                     for op in ("commit", "put", "get")}
    out["met"] = out["generate"]["pg"]["diff_p50"] * 1000 <= GOAL_OVERHEAD_MS and errors == 0
    out["journal_met"] = out["generate"]["pgfolder"]["diff_p50"] * 1000 <= GOAL_OVERHEAD_MS and errors == 0
    return out


class _Floors:
    """What the shared backends cost at the least, timed in the same rounds: one durable PostgreSQL commit
    of one row, and one PUT and one GET of a result-sized object on the S3 endpoint (obstore, as the store)."""

    def __init__(self, url: str, s3: MotoProcess, bucket: str, fake: FakeProcess):
        import psycopg
        from obstore.store import S3Store

        from tests.cluster_env import S3_KEY_ID, S3_REGION, S3_SECRET

        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id BIGSERIAL PRIMARY KEY, body JSONB)")
        self.store = S3Store(bucket, endpoint=s3.endpoint, access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET,
                             region=S3_REGION, client_options={"allow_http": True})
        self.image = httpx2.get(f"{fake.url}/files/floor.png", timeout=30).content
        self.n = 0
        self.put()  # the object `get` reads

    def commit(self) -> None:
        self.conn.execute("INSERT INTO bench_floor (body) VALUES (%s::jsonb)", ('{"status": "succeeded"}',))

    def put(self) -> None:
        import obstore

        self.n += 1
        obstore.put(self.store, f"floor/{self.n}.png", self.image)

    def get(self) -> None:
        import obstore

        obstore.get(self.store, "floor/1.png").bytes()

    def close(self) -> None:
        self.conn.close()


# --- the report -----------------------------------------------------------------------------------------

def _s(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else secs(x)


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.0%}"


def _ms(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 1000:.0f} ms"


def _scenario_rows(r: dict[str, Any]) -> list[str]:
    """The summary table's rows for scenarios D (rolling restart) and A (1 replica against 3)."""
    rows: list[str] = []
    p = r["parameters"]
    if rolls := [x for x in r["runs"] if x.get("roll")]:
        beyond = sum(x["roll"]["cut_beyond_in_flight"] for x in rolls)
        errors = sum(x["statuses"].get("error", 0) for x in rolls)
        handed = [e for x in rolls for e in x["roll"]["events"] if e["handed_over"]]
        worst = max((e["handover_s"]["max"] for e in handed), default=math.nan)
        rows += [f"| rolling restart (SIGTERM each replica in turn): calls cut beyond those in flight / calls "
                 f"ended in an error | {beyond} / {errors} over {sum(x['calls'] for x in rolls)} calls | 0 / 0 "
                 f"| {verdict(beyond == 0 and errors == 0)} |",
                 f"| rolling restart: SIGTERM to another replica's first status request, per handed-over job, worst "
                 f"| {_s(worst)} ({sum(e['handed_over'] for e in handed)} jobs; the stop's graceful wait is 5 s) "
                 f"| no lease wait (< {p['lease_s']:g} s) | {verdict(not math.isnan(worst) and worst < p['lease_s'])} |"]
    base3 = r.get("base3") or next((x for x in r["runs"] if x["tag"] == "base"), None)
    if (base1 := r.get("base1")) and base3:
        k1, k3 = (r.get("ramp1") or {}).get("knee"), (r.get("ramp3") or {}).get("knee")
        top = max(p["ramp"])
        knee_ok = (k3 or math.inf) >= (k1 or math.inf) or k3 is None
        st = [x.get("statements", {}).get("per_job", math.nan) for x in (base1, base3)]
        sr = [x["status_requests_per_job"] for x in (base1, base3)]
        rows += [f"| 1 replica vs 3: the knee (calls/s where p95 passes 2 x the job), 1 / 3 replicas "
                 f"| {k1 or f'> {top:g}'} / {k3 or f'> {top:g}'} | 3 not lower | {verdict(knee_ok)} |",
                 f"| DB statements per job (pg_stat_statements; BEGIN/COMMIT and periodic ones apart), 1 / 3 replicas "
                 f"| {st[0]:.2f} / {st[1]:.2f} | <= 4 | {verdict(max(st) <= 4)} |",
                 f"| status requests per job, 1 / 3 replicas | {sr[0]:.2f} / {sr[1]:.2f} | <= 1.3 "
                 f"| {verdict(max(sr) <= 1.3)} |"]
    return rows


def _scenario_d(r: dict[str, Any]) -> list[str]:
    rolls = [x for x in r["runs"] if x.get("roll")]
    if not rolls:
        return []
    p = r["parameters"]
    lines = ["", "## Scenario D: rolling restart", "",
             f"One run per replica, in turn: {p['calls']} calls over {p['spread_s']:g} s, keys on, every tenth with a "
             f"{3 * p['job_s']:g} s job (it outlives the stopping replica's 5 s graceful wait, so it is handed over); "
             f"{p['kill_at_s']:g} s in "
             "the replica gets SIGTERM, and once it has exited it is started again and haproxy routes to it again "
             "(the next run starts after that). *Under way*: attempts in progress at the SIGTERM that it answered "
             "or that were cut. *Hand-over*: for each job it had submitted that was not final at the SIGTERM, the "
             "time from the SIGTERM to the first status request another replica sent about it (the fake tells the "
             "replicas apart by the base URL each was given); a lease left to lapse would take up to "
             f"{p['lease_s']:g} s after the last heartbeat, plus the reconciler's pass.", "",
             "| run | replica | exit | stop took | restart / routed again | under way | answered while "
             "stopping (after SIGTERM p50 / max) | cut in flight | cut beyond | errors | its pending jobs | finished "
             "by itself | handed over | hand-over p50 / max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rolls:
        d = x["roll"]
        for e in d["events"]:
            lines.append(
                f"| {x['tag']} | {e['replica']} | {e['exit_status']} | {_s(e['stop_s'])} "
                f"| {_s(e['restart_s'])} / {_s(e['routed_s'])} | {e['under_way']} | {e['answered_while_stopping']} "
                f"({_s(e['answered_s']['p50'])} / {_s(e['answered_s']['max'])}) | {e['cut_in_flight']} "
                f"| {d['cut_beyond_in_flight']} | {x['statuses'].get('error', 0)} | {e['pending_jobs']} "
                f"| {e['finished_by_itself']} | {e['handed_over']} "
                f"| {_ms(e['handover_s']['p50'])} / {_ms(e['handover_s']['max'])} |")
    reasons: Counter[str] = Counter()
    for x in rolls:
        reasons.update(x["roll"]["cut_beyond_reasons"])
    lines += ["", "Over the rolling-restart runs: outcomes " + "; ".join(
        f"{x['tag']} " + ", ".join(f"{k} {v}" for k, v in sorted(x["statuses"].items())) for x in rolls)
        + f"; doubles {sum(x['double_submissions'] for x in rolls)}, lost {sum(x['lost'] for x in rolls)}; cut "
        "attempts that began with no SIGTERM under way (beyond those in flight): "
        f"{sum(x['roll']['cut_beyond_in_flight'] for x in rolls)} ("
        + (", ".join(f"{k} {v}" for k, v in reasons.items()) or "none") + "); p50 / p95 of all calls "
        + ", ".join(f"{_s(x['latency_s']['p50'])} / {_s(x['latency_s']['p95'])}" for x in rolls) + "."]
    return lines


def _scenario_a(r: dict[str, Any]) -> list[str]:
    base3 = r.get("base3") or next((x for x in r["runs"] if x["tag"] == "base"), None)
    base1 = r.get("base1")
    if base1 is None or base3 is None:
        return []
    p = r["parameters"]
    lines = ["", "## Scenario A: 1 replica against 3", "",
             f"{p['calls']} calls over {p['spread_s']:g} s, no kill, through haproxy to 1 replica and to 3, each cluster "
             "started on a fresh database after the runs above (the same machine, PostgreSQL, moto and fake). Statements: pg_stat_statements on the run's database, "
             "reset before the run and read after it (the bench's own reads left out). *Per job*: the statements of "
             "the calls themselves (intent, record, lookups, final state, charges) over the jobs the provider "
             "accepted, BEGIN/COMMIT apart; *periodic*: those no job causes (heartbeats, the reconciler's passes, "
             "haproxy's readiness checks, LISTEN), over the same jobs.", "",
             "| replicas | p50 / p95 (job: " + f"{p['job_s']:g} s) | status requests per job | statements per job "
             "| transactions per job | periodic statements per job | knee (p95 > 2 x job) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, base, ramp_ in ((1, base1, r.get("ramp1")), (3, base3, r.get("ramp3"))):
        st = base.get("statements") or {}
        knee = ramp_ and (f"{ramp_['knee']:g} calls/s" if ramp_["knee"] else
                          f"not reached by {ramp_['steps'][-1]['rate']:g} calls/s")
        lines.append(f"| {n} | {_s(base['latency_s']['p50'])} / {_s(base['latency_s']['p95'])} "
                     f"| {base['status_requests_per_job']:.2f} | {st.get('per_job', math.nan):.2f} "
                     f"| {st.get('transactions_per_job', math.nan):.2f} | {st.get('background_per_job', math.nan):.2f} "
                     f"| {knee or 'n/a'} |")
    st = base3.get("statements") or {}
    if st.get("top"):
        lines += ["", "The jobs' statements on 3 replicas, per job: " + "; ".join(
            f"{t['per_job']:.2f} × `{t['query'][:70]}`" for t in st["top"][:6])]
    for key in ("ramp1", "ramp3"):
        if ramp_ := r.get(key):
            lines += ["", f"Ramp, {ramp_['replicas']} replica(s) ({ramp_['step_s']:g} s per rate, each rate its own run): "
                      + "; ".join(f"{x['rate']:g}/s → p50 {_s(x['p50'])}, p95 {_s(x['p95'])}, "
                                  f"{x['status_requests_per_job']:.2f} status req/job"
                                  + (f", {x['errors']} errors" if x["errors"] else "") for x in ramp_["steps"])]
    return lines


def markdown(r: dict[str, Any]) -> str:
    t, p, env = r["totals"], r["parameters"], r["environment"]
    runs = r["runs"]
    killed = [x for x in runs if x["victim"]]
    lines = [
        "# flux-mcp cluster benchmark: 3 replicas behind haproxy, one SIGKILLed mid-run", "",
        f"`{r['command']}` — {env['date']}, commit {env['commit']}, {env['cpus']} CPUs, load average "
        f"{env['load']} at the start and {env.get('load_end', '?')} at the end (a shared machine: other "
        f"work ran beside it), {r['seconds']:.0f} s in all. PostgreSQL {'/'.join(env['postgresql'])} "
        "(fsync and synchronous commits on), moto S3 in its own process, haproxy with deploy/haproxy.cfg, the "
        f"Atlas Cloud fake: {p['job_s']:g} s jobs, submit answers {p['submit_delay_s'][0] * 1000:.0f}-"
        f"{p['submit_delay_s'][1] * 1000:.0f} ms after the job exists, polled mode. {p['calls']} "
        f"`generate_image` calls per run over {p['spread_s']:g} s from {p['users']} users (tokens); the killed runs SIGKILL one replica "
        f"{p['kill_at_s']:g} s in; cut calls are re-issued at once with the same arguments (and key).", "",
        "| figure | result | goal | |", "| --- | --- | --- | --- |",
        f"| double submissions (accepted submits per call beyond the first) | {t['double_submissions']} over "
        f"{sum(x['calls'] for x in runs)} calls ({t['killed_calls']} in {t['killed_runs']} killed runs) | 0 "
        f"| {verdict(t['double_submissions'] == 0)} |",
        f"| lost predictions (accepted by the provider, call not ended succeeded with its images in the bucket "
        f"nor unknown) | {t['lost']} (paid jobs no row holds: {t['paid_not_delivered']}) | 0 "
        f"| {verdict(t['lost'] == 0 and t['paid_not_delivered'] == 0)} |",
        f"| `unknown` / the killed replica's in-flight calls | {t['unknown']} / {t['killed_in_flight']} "
        f"({t['unknown_share']:.1%}) | <= 1 % | {verdict(t['unknown_share'] <= GOAL_UNKNOWN)} |",
    ]
    extra_max = t["cut_extra_max_s"]
    lines.append(f"| cut calls: answer after the kill minus what was left of the job, worst of all runs | "
                 f"{_s(extra_max)} | <= lease ({p['lease_s']:g} s) + 1 s "
                 f"| {verdict(not math.isnan(extra_max) and extra_max <= p['lease_s'] + 1)} |")
    worst50 = max((x["vs_base"]["p50"] for x in killed), default=math.nan)
    worst95 = max((x["vs_base"]["p95"] for x in killed), default=math.nan)
    base = next(x for x in runs if x["victim"] is None)
    lines.append(f"| calls on the surviving replicas, p50 / p95 against the no-kill run "
                 f"({_s(base['survivor_latency_s']['p50'])} / {_s(base['survivor_latency_s']['p95'])}), worst run "
                 f"| {_pct(worst50)} / {_pct(worst95)} | within 10 % "
                 f"| {verdict(worst50 <= GOAL_LATENCY and worst95 <= GOAL_LATENCY)} |")
    if o := r.get("overhead"):
        g = o["generate"]
        lines.append(f"| per-call overhead, `generate_image` p50, PostgreSQL + S3 vs SQLite + folder (one server "
                     f"each, zero-latency fake) | {secs(g['pg']['p50'])} vs {secs(g['sqlite']['p50'])}: "
                     f"{g['pg']['diff_p50'] * 1000:+.1f} ms (commits not flushed: "
                     f"{g['pgasync']['diff_p50'] * 1000:+.1f} ms) | <= +{GOAL_OVERHEAD_MS:g} ms "
                     f"| {verdict(o['met'])} |")
    lines += [
        f"| rows left pending after the runs | {t['pending_rows']} | 0 | {verdict(t['pending_rows'] == 0)} |",
        f"| presigned links that download (sampled) | {t['presigned']['ok']} / {t['presigned']['checked']} | all "
        f"| {verdict(t['presigned']['ok'] == t['presigned']['checked'])} |",
        f"| calls that ended in an error | {t['errors']} (of which not answered within "
        f"{p['spread_s'] + p['call_limit_s']:g} s: {t['unfinished_calls']}; jobs the journal finished whose call "
        f"had no answer: {t['finished_but_not_answered']}) | 0 | {verdict(t['errors'] == 0)} |",
    ]
    lines += _scenario_rows(r)
    lines += [
        "", "## Runs", "",
        "| run | keys | killed (at) | outcomes | provider submits | doubles | lost | unknown / in flight "
        "(submits in flight) | cut after the kill | re-issues | status requests per job | p50 / p95, all calls "
        "| survivors p50 / p95 (vs no kill) | cut calls: extra p50 / max | wall | load before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in runs:
        sv, vs = x["survivor_latency_s"], x.get("vs_base")
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(x["statuses"].items()))
        kill = f"{x['victim']} ({x['kill_at_s']:.2f} s)" if x["victim"] else "none"
        versus = f" ({_pct(vs['p50'])} / {_pct(vs['p95'])})" if vs else ""
        cut = (f"{_s(x['cut_extra_s']['p50'])} / {_s(x['cut_extra_s']['max'])}" if x["cut_extra_s"]["n"] else "–")
        lines.append(
            f"| {x['tag']} | {'yes' if x['keyed'] else 'no'} | {kill} | {outcomes} | {x['provider_submits']} "
            f"| {x['double_submissions']} | {x['lost']} | {x['unknown']} / {x['killed_in_flight']} "
            f"({x['killed_submits_in_flight']}) | {x['cut_after_kill']} | {x['reissues']} "
            f"| {x['status_requests_per_job']:.2f} | {_s(x['latency_s']['p50'])} / {_s(x['latency_s']['p95'])} "
            f"| {_s(sv['p50'])} / {_s(sv['p95'])}{versus} | {cut} | {x['wall_s']:.1f} s "
            f"| {' '.join(map(str, x['load_before']))} → {' '.join(map(str, x['load_after']))} |")
    reasons: Counter[str] = Counter()
    for x in runs:
        reasons.update(x.get("cut_reasons", {}))
    if reasons:
        lines += ["", "Cut attempts by what the client saw: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())]
    if parted := [x for x in killed if x.get("cut_parts_s", {}).get("n")]:
        lines += ["", "Cut calls, where the time after the kill went (p50 / max per run; the worst call's own parts "
                  "last): *take-over*: the kill to the first status request a survivor sent about the job (the fake "
                  "tells replicas apart); *poll lag*: from then (or the job's end, if later) to the request that "
                  "found it done; *delivery*: that request to the call's answer (the image kept in the bucket, the "
                  "final write and its NOTIFY, the waiting call's wake-up, the answer through haproxy).", "",
                  "| run | cut calls | first re-issue | take-over | poll lag | delivery | the worst call: extra (take-over, "
                  "job remaining at the kill, poll lag, delivery) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for x in parted:
            c, w = x["cut_parts_s"], x["cut_parts_s"]["worst"]
            cells = " | ".join(f"{_s(c[k]['p50'])} / {_s(c[k]['max'])}"
                               for k in ("first_reissue", "takeover", "poll_lag", "delivery"))
            lines.append(f"| {x['tag']} | {c['n']} | {cells} | {_s(w['extra'])} ({_s(w['takeover'])}, "
                         f"{_s(w['remaining'])}, {_s(w['poll_lag'])}, {_s(w['delivery'])}) |")
    late = [t for x in runs for t in x.get("unknown_answered_vs_kill_s", [])]
    if late:
        lines += ["", "The provider's answer to each `unknown` job's submit, against the kill: "
                  + ", ".join(f"{t * 1000:+.0f} ms" for t in late) + " (negative: answered before the kill, so the "
                  "replica died between reading the answer and committing it)."]
    kinds: Counter[str] = Counter()
    for x in runs:
        kinds.update(x.get("error_kinds", {}))
    if kinds:
        lines += ["", "Calls that ended in an error, by kind: " + "; ".join(f"{n} × `{k}`" for k, n in
                                                                          kinds.most_common(6))]
    problems = [f"{x['tag']}: {x['restart_problem']}" for x in runs if x.get("restart_problem")]
    if problems:
        lines += ["", "After a restart: " + "; ".join(problems)]
    lines += _scenario_d(r) + _scenario_a(r)
    if o := r.get("overhead"):
        lines += ["", *overhead_markdown(o)]
    lines += ["", "## Reading the figures", "",
              "* *In flight on the killed replica*: calls whose first attempt began before the kill and was cut "
              "(haproxy's 502 or a broken stream). *Submits in flight*: those whose submit the fake had received "
              "but not yet answered at the kill (the window where only a lease's intent row can tell what "
              "happened). *Cut after the kill*: calls haproxy could not place before its health check marked the "
              "replica down (they never reached a replica).",
              "* *Cut calls, extra*: the answer's time after the kill minus what was left of its job at the kill; "
              "what a lease adds (the goal allows the lease plus 1 s).",
              "* *Survivors*: calls never cut and answered by a replica that was not killed; the no-kill run's are "
              "the baseline. After a kill, two replicas carry the third's calls on a shared 2-core machine, so "
              "part of any difference is CPU, not coordination.",
              "* The survivors' figure only counts calls never cut. When haproxy has no replica to route to (its "
              "health checks time out on busy replicas: see the run's haproxy log), calls get 503s and count as cut, "
              "so the calls left in the figure are the ones that finished early: read it with the cut counts.",
              "* `unknown` is what a replica that died between the provider's answer and committing it leaves: the "
              "answer times above show how long that window is on this machine under this load.",
              "* Every call's wall time includes its 5 s job; all processes (3 replicas, haproxy, PostgreSQL, moto, "
              "the fake, the client) share the machine's cores with other work: the load averages are beside "
              "each run."]
    return "\n".join(lines) + "\n"


def overhead_markdown(o: dict[str, Any]) -> list[str]:
    """The overhead section: one column per server of BACKENDS, the differences against SQLite, the floors."""
    others = [b for b in BACKENDS if b != "sqlite"]
    lines = ["## Overhead: PostgreSQL + S3 against SQLite + the data folder", "",
             f"One server of each on the zero-latency fake (done at its first status request), held submits "
             f"(Atlas Cloud's single-server default, opted into on the shared servers too, so each sends one "
             f"request per job), {o['rounds']} rounds with the operations shuffled in each, bare JSON-RPC over "
             "streamable HTTP (shared mode is stateless: no session), 64x64 results. Errors: " + str(o["errors"]) + ".",
             "", "| call | " + " | ".join(f"{label} p50 / p95" for label in BACKENDS.values())
             + " | p50 difference against SQLite |", "| --- " * (len(BACKENDS) + 2) + "|"]
    short = {"pg": "durable", "pgasync": "not flushed", "pgfolder": "journal alone"}
    for op, label in (("generate", "`generate_image`"), ("check", "`check_prediction`, finished job"),
                      ("ping", "`ping` (the transport alone: stateless in shared mode)")):
        if op not in o:
            continue
        x = o[op]
        cells = " | ".join(f"{secs(x[b]['p50'])} / {secs(x[b]['p95'])}" if b in x else "n/a" for b in BACKENDS)
        diffs = ", ".join(f"{short[b]} {x[b]['diff_p50'] * 1000:+.1f} ms" for b in others if b in x)
        lines.append(f"| {label} | {cells} | {diffs} |")
    if f := o.get("floors"):
        lines += ["", "The floors, timed in the same rounds: one durable PostgreSQL commit of one row "
                  f"{secs(f['commit']['p50'])} p50 ({secs(f['commit']['p95'])} p95); on moto's S3 server one PUT "
                  f"of the result {secs(f['put']['p50'])} ({secs(f['put']['p95'])}), one GET "
                  f"{secs(f['get']['p50'])} ({secs(f['get']['p95'])}). A `generate_image` in shared mode writes "
                  "its intent (with its reservation in the spend ledger), its record (with the ledger's charge) "
                  "while its image is PUT, then its final state, and signs its link (its delivered mark follows the "
                  "answer, batched with others); a finished `check_prediction` "
                  "reads its row and GETs its image once (the preview, and the proof that it is still there)."]
    return lines


def overhead_only_markdown(r: dict[str, Any]) -> str:
    """`--only-overhead`: the overhead section alone, with its goal lines."""
    env, o = r["environment"], r["overhead"]
    g = o["generate"]
    return "\n".join([
        "# flux-mcp shared-mode overhead: PostgreSQL + S3 against SQLite + folder", "",
        f"`{r['command']}` — {env['date']}, commit {env['commit']}, {env['cpus']} CPUs, load average {env['load']} "
        f"at the start and {env.get('load_end', '?')} at the end (a shared machine: other work ran beside it), "
        f"{r['seconds']:.0f} s in all. PostgreSQL {'/'.join(env['postgresql'])}, moto S3 in its own process.", "",
        "| figure | result | goal | |", "| --- | --- | --- | --- |",
        f"| `generate_image` p50, PostgreSQL + S3 vs SQLite + folder | {secs(g['pg']['p50'])} vs "
        f"{secs(g['sqlite']['p50'])}: {g['pg']['diff_p50'] * 1000:+.1f} ms | <= +{GOAL_OVERHEAD_MS:g} ms "
        f"| {verdict(o['met'])} |",
        f"| `generate_image` p50, PostgreSQL + folder vs SQLite + folder (the journal alone) | "
        f"{secs(g['pgfolder']['p50'])} vs {secs(g['sqlite']['p50'])}: {g['pgfolder']['diff_p50'] * 1000:+.1f} ms "
        f"| <= +{GOAL_OVERHEAD_MS:g} ms | {verdict(o['journal_met'])} |", "",
        *overhead_markdown(o)]) + "\n"


# --- the whole benchmark --------------------------------------------------------------------------------

def _environment() -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or None
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(), "platform": platform.platform(), "mcp": version("mcp"),
        "flux_mcp": version("flux-image-mcp"), "commit": commit,
        "postgresql": subprocess.run(["sh", "-c", "ls /usr/lib/postgresql"], capture_output=True,
                                     text=True).stdout.split(),
    }


def _totals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    killed = [r for r in runs if r["victim"]]
    in_flight = sum(r["killed_in_flight"] for r in killed)
    unknown = sum(r["unknown"] for r in killed)
    return {
        "killed_runs": len(killed),
        "killed_calls": sum(r["calls"] for r in killed),
        "double_submissions": sum(r["double_submissions"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "paid_not_delivered": sum(r["paid_not_delivered"] for r in runs),
        "unknown": unknown,
        "killed_in_flight": in_flight,
        "unknown_share": unknown / in_flight if in_flight else 0.0,
        "pending_rows": sum(r["pending_rows"] for r in runs),
        "finished_but_not_answered": sum(r.get("finished_but_not_answered", 0) for r in runs),
        "unfinished_calls": sum(r.get("unfinished_calls", 0) for r in runs),
        "errors": sum(r["statuses"].get("error", 0) for r in runs),
        "cut_extra_max_s": max((r["cut_extra_s"]["max"] for r in killed if r["cut_extra_s"]["n"]), default=math.nan),
        "presigned": {"checked": sum(r["presigned"]["checked"] for r in runs),
                      "ok": sum(r["presigned"]["ok"] for r in runs)},
    }


def _only_overhead(results: dict[str, Any], started: float, args: argparse.Namespace, say: Any) -> int:
    results["seconds"] = time.monotonic() - started
    results["environment"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stem = "cluster-overhead" + (f"-{args.name}" if args.name else "")
    args.out.mkdir(parents=True, exist_ok=True)
    dump(args.out / f"{stem}.json", results)
    text = overhead_only_markdown(results)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    say(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: 100 calls, one keyed and one key-less "
                                                             "killed run (about 3 minutes)")
    parser.add_argument("--calls", type=int, help="calls per run")
    parser.add_argument("--runs", type=int, help="killed runs with idempotency keys")
    parser.add_argument("--keyless-runs", type=int, help="killed runs whose clients send no idempotency_key")
    parser.add_argument("--users", type=int, help="the team's size: calls are spread over this many tokens")
    parser.add_argument("--no-overhead", action="store_true", help="skip the PostgreSQL+S3 vs SQLite figure")
    parser.add_argument("--only-overhead", action="store_true", help="the PostgreSQL+S3 vs SQLite figure alone, no "
                                                                     "kill runs (about a minute; cluster-overhead.*)")
    parser.add_argument("--no-roll", action="store_true", help="skip scenario D (the rolling restart)")
    parser.add_argument("--no-ramp", action="store_true", help="skip scenario A's 1-replica run and both ramps")
    parser.add_argument("--no-statements", action="store_true", help="do not load pg_stat_statements")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--check-timeout", help="haproxy's `timeout check` (deployed: unset, i.e. the 2 s interval)")
    parser.add_argument("--name", help="results go to cluster-NAME.md/.json")
    parser.add_argument("--logs", type=Path, help="copy the replicas' and haproxy's logs here at the end")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for name, value in (("calls", args.calls), ("killed_runs", args.runs), ("keyless_runs", args.keyless_runs),
                        ("users", args.users)):
        if value is not None:
            p[name] = value
    started = time.monotonic()
    results: dict[str, Any] = {"command": "python -m bench.cluster" + (" --quick" if args.quick else "")
                               + (" --only-overhead" if args.only_overhead else "")
                               + (f" --check-timeout {args.check_timeout}" if args.check_timeout else ""),
                               "quick": args.quick, "parameters": p, "environment": _environment()}
    rng = random.Random(5)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="flux-bench-cluster-") as tmp:
        workdir = Path(tmp)
        pg = Postgres.start(durable=True)
        try:
            stats = Statements(pg) if not args.no_statements else None  # (restarts it once, with the module)
            s3 = MotoProcess.start()
            try:
                with FakeProcess(workdir) as fake:
                    if not args.no_overhead:
                        say("overhead: PostgreSQL + S3 vs SQLite + folder, one server each")
                        results["overhead"] = overhead(workdir, fake, pg, s3, p)
                    if args.only_overhead:
                        return _only_overhead(results, started, args, say)
                    fake.configure(submit_delay=tuple(p["submit_delay_s"]))
                    fake.serve_image("png", 64, 64, "flat")
                    database = pg.create_database("cluster")
                    bucket = s3.create_bucket()
                    lease = {"FLUX_MCP_LEASE_SECONDS": f"{p['lease_s']:g}"}
                    runs: list[dict[str, Any]] = []
                    say("starting 3 replicas and haproxy")
                    with Cluster(workdir / "cluster", pg.url(database), s3.env(bucket), fake.url, KEY,
                                 team(p["users"]), env={"FLUX_MCP_LOG_LEVEL": "WARNING", **lease},
                                 check_timeout=args.check_timeout, provider_via=True) as cluster:
                        say("warm-up: the journal learns the job length")
                        one_run(cluster, fake, pg, database, bucket, "warm", {**p, "calls": 12, "spread_s": 1.0,
                                "presigned_checks": 0}, keyed=True, victim=None, rng=rng)
                        names = [r.name for r in cluster.replicas]
                        plan: list[tuple[str, bool, str | None, list[str] | None]] = [("base", True, None, None)]
                        for i in range(p["killed_runs"]):
                            plan.append((f"kill{i + 1}", True, names[(i + 1) % len(names)], None))
                        for i in range(p["keyless_runs"]):
                            plan.append((f"keyless{i + 1}", False, names[(i + 2) % len(names)], None))
                        # Scenario D last: its 15 s jobs and restarts under load must not change what the kill
                        # runs are compared with (the job length the journal learned during the no-kill run).
                        if not args.no_roll:  # one SIGTERM per run, each replica in turn
                            plan += [(f"roll{i + 1}", True, None, [name])
                                     for i, name in enumerate(names[:p["roll_runs"]])]
                        for tag, keyed, victim, roll in plan:
                            say(f"run {tag}: {p['calls']} calls" + (f", SIGKILL {victim}" if victim else "")
                                + (f", SIGTERM {', '.join(roll)} in turn" if roll else "")
                                + ("" if victim or roll else ", no kill") + ("" if keyed else ", no idempotency keys"))
                            run = one_run(cluster, fake, pg, database, bucket, tag,
                                          {**p, "long_every": 10} if roll else p, keyed=keyed, victim=victim,
                                          rng=rng, roll=roll, stats=stats if tag == "base" else None)
                            say(f"  {run['statuses']}, doubles {run['double_submissions']}, lost {run['lost']}, "
                                f"unknown {run['unknown']}/{run['killed_in_flight']} in flight, "
                                f"wall {run['wall_s']:.1f} s" + (f", cut beyond in flight "
                                f"{run['roll']['cut_beyond_in_flight']}, hand-over max "
                                f"{run['roll']['handover_max_s']:.2f} s" if roll else ""))
                            runs.append(run)
                            if victim:
                                cluster.restart(victim)
                                t0 = time.monotonic()
                                try:
                                    cluster.wait_routed_to_all(limit=180)
                                except RuntimeError as exc:  # reported; the next run starts with what routes
                                    run["restart_problem"] = str(exc)
                                run["routed_again_after_s"] = time.monotonic() - t0
                    results["runs"] = runs
                    # Scenario A on fresh clusters (a fresh database each): the job length a journal learned under
                    # the runs above would otherwise set when every later call first asks about its job.
                    for size in (() if args.no_ramp else (3, 1)):
                        say(f"scenario A: {size} replica(s) behind haproxy, a fresh database")
                        one_db, one_bucket = pg.create_database(f"a{size}"), s3.create_bucket()
                        with Cluster(workdir / f"a{size}", pg.url(one_db), s3.env(one_bucket), fake.url, KEY,
                                     team(p["users"]), size=size, env={"FLUX_MCP_LOG_LEVEL": "WARNING", **lease},
                                     check_timeout=args.check_timeout, provider_via=True) as fresh:
                            one_run(fresh, fake, pg, one_db, one_bucket, f"warm{size}", {**p, "calls": 12,
                                    "spread_s": 1.0, "presigned_checks": 0}, keyed=True, victim=None, rng=rng)
                            say(f"run base{size}: {p['calls']} calls, {size} replica(s)")
                            results[f"base{size}"] = one_run(fresh, fake, pg, one_db, one_bucket, f"base{size}", p,
                                                             keyed=True, victim=None, rng=rng, stats=stats)
                            results[f"ramp{size}"] = ramp(fresh, fake, pg, one_db, one_bucket, f"ramp{size}", p, rng,
                                                          say)
            finally:
                s3.stop()
        finally:
            pg.stop()
            if args.logs:
                import shutil

                args.logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.rglob("*.log"):
                    shutil.copy(log, args.logs / f"{log.parent.name}-{log.name}")
    base = next(r for r in results["runs"] if r["victim"] is None)
    for r in results["runs"]:
        if r["victim"]:
            b, k = base["survivor_latency_s"], r["survivor_latency_s"]
            r["vs_base"] = {"p50": k["p50"] / b["p50"] - 1, "p95": k["p95"] / b["p95"] - 1}
    results["totals"] = _totals(results["runs"])
    results["seconds"] = time.monotonic() - started
    results["environment"]["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stem = ("cluster-quick" if args.quick else "cluster") + (f"-{args.name}" if args.name else "")
    p["check_timeout"] = args.check_timeout
    args.out.mkdir(parents=True, exist_ok=True)
    dump(args.out / f"{stem}.json", results)  # first: the samples survive a report that fails
    text = markdown(results)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    say(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
