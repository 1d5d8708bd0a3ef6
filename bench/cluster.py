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
    "presigned_checks": 50, "users": 10, "call_limit_s": 150.0,
}
QUICK: dict[str, Any] = {
    **FULL, "calls": 100, "killed_runs": 1, "keyless_runs": 1, "spread_s": 4.0, "kill_at_s": 2.0,
    "overhead_rounds": 40, "overhead_warmup": 5, "presigned_checks": 10,
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
                 prompt_of: Any) -> tuple[list[Call], float | None]:
    tokens = list(team(p["users"]).values())
    calls = [Call(i, f"{tag}-{i:04d}-{uuid.uuid4().hex[:6]}", f"{tag}-key-{i:04d}" if keyed else None,
                  tokens[i % len(tokens)]) for i in range(p["calls"])]
    killed: list[float] = []
    limits = httpx2.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(180, connect=10), limits=limits, trust_env=False) as http:
        start = time.monotonic()
        gap = p["spread_s"] / max(len(calls), 1)

        async def launch(c: Call) -> None:
            await anyio.sleep(max(0.0, start + c.index * gap - time.monotonic()))
            await run_call(c, http, cluster.url, prompt_of(c))

        async def kill() -> None:
            assert victim is not None
            await anyio.sleep(max(0.0, start + p["kill_at_s"] - time.monotonic()))
            killed.append(cluster.kill(victim))

        with anyio.move_on_after(p["spread_s"] + p["call_limit_s"]):
            async with anyio.create_task_group() as tg:
                for c in calls:
                    tg.start_soon(launch, c)
                if victim:
                    tg.start_soon(kill)
    for c in calls:
        if c.end is None:  # still unanswered at the limit: reported as such, with what it saw last
            c.error = (f"not finished within {p['spread_s'] + p['call_limit_s']:g} s (last status {c.status}, "
                       f"{len(c.attempts)} attempts, last {c.attempts[-1].tool if c.attempts else '-'} "
                       f"{'cut: ' + str(c.attempts[-1].cut) if c.attempts and c.attempts[-1].cut else ''})")
    return calls, (killed[0] if killed else None)


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
    for c in in_flight:
        job = jobs.get(str(c.prediction_id).removeprefix("atlascloud:"))
        if c.end is None or kill_at is None or job is None or job.complete_at is None:
            continue
        remaining = max(0.0, job.complete_at - kill_at)
        extra.append((c.end - kill_at) - remaining)
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


def one_run(cluster: Cluster, fake: FakeProcess, pg: Postgres, database: str, bucket: str, tag: str,
            p: dict[str, Any], *, keyed: bool, victim: str | None, rng: random.Random) -> dict[str, Any]:
    def prompt_of(c: Call) -> str:
        return f"bench cluster call {c.index} [duration={p['job_s']:.4f}] [nonce={c.nonce}]"

    load_before = os.getloadavg()
    calls, kill_at = anyio.run(lambda: _drive(cluster, tag, p, keyed=keyed, victim=victim, prompt_of=prompt_of))
    jobs = fake.jobs()
    rows = cluster.rows(pg.psql, database, f"request->>'prompt' LIKE '%[nonce={tag}-%'")
    all_pending = cluster.rows(pg.psql, database, "status IN ('starting', 'processing', 'submitting')")
    keys = set(list_keys(cluster.s3_env["AWS_ENDPOINT_URL"], bucket))
    result = _analyse(calls, jobs, rows, keys, bucket, kill_at, victim, p,
                      _presigned(calls, p["presigned_checks"], rng))
    result.update({"tag": tag, "keyed": keyed, "victim": victim, "kill_at_s":
                   (kill_at - min(c.start for c in calls)) if kill_at else None,
                   "pending_rows_anywhere": len(all_pending), "load_before": [round(x, 2) for x in load_before],
                   "load_after": [round(x, 2) for x in os.getloadavg()]})
    return result


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
                  "while its image is PUT, then its final state, and signs its link; a finished `check_prediction` "
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
                    say("starting 3 replicas and haproxy")
                    lease = {"FLUX_MCP_LEASE_SECONDS": f"{p['lease_s']:g}"}
                    with Cluster(workdir / "cluster", pg.url(database), s3.env(bucket), fake.url, KEY,
                                 team(p["users"]), env={"FLUX_MCP_LOG_LEVEL": "WARNING", **lease},
                                 check_timeout=args.check_timeout) as cluster:
                        say("warm-up: the journal learns the job length")
                        one_run(cluster, fake, pg, database, bucket, "warm", {**p, "calls": 12, "spread_s": 1.0,
                                "presigned_checks": 0}, keyed=True, victim=None, rng=rng)
                        plan: list[tuple[str, bool, str | None]] = [("base", True, None)]
                        names = [r.name for r in cluster.replicas]
                        for i in range(p["killed_runs"]):
                            plan.append((f"kill{i + 1}", True, names[(i + 1) % len(names)]))
                        for i in range(p["keyless_runs"]):
                            plan.append((f"keyless{i + 1}", False, names[(i + 2) % len(names)]))
                        runs = []
                        for tag, keyed, victim in plan:
                            say(f"run {tag}: {p['calls']} calls" + (f", SIGKILL {victim}" if victim else ", no kill")
                                + ("" if keyed else ", no idempotency keys"))
                            run = one_run(cluster, fake, pg, database, bucket, tag, p, keyed=keyed,
                                          victim=victim, rng=rng)
                            say(f"  {run['statuses']}, doubles {run['double_submissions']}, lost {run['lost']}, "
                                f"unknown {run['unknown']}/{run['killed_in_flight']} in flight, "
                                f"wall {run['wall_s']:.1f} s")
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
