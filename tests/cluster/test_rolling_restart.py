"""A rolling restart: three replicas of the real command behind haproxy (deploy/haproxy.cfg), each SIGTERMed
in turn and started again before the next, while calls are under way. A replica that gets SIGTERM stops
accepting connections at once (haproxy sends new calls to the others), answers what it already received,
cuts what is still waiting when its graceful stop runs out, and hands the leases of those jobs over at once:
another replica asks the provider about each of them long before the lease would have lapsed. Every call,
re-issued with its idempotency_key whenever it is cut, ends `succeeded`; no job is paid twice. The provider
is the Atlas Cloud fake on loopback: jobs stay processing until the test finishes them, and each replica
reaches it at its own base URL (`/via/<replica>`), so the fake knows which replica sent each request.
Every wait is bounded with `anyio.fail_after` (the hand-over by a fraction of the lease); none is an
assertion on wall-clock time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest

from tests.cluster.replicas import Cluster, Cut, call_tool, new_nonce, nonce_of, submits_per_nonce, with_nonce
from tests.conftest import ATLAS_KEY
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import serve_on_loopback

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.subprocess]
ALICE = "alice-token-8c2e4a6f0b1d-7e9c3a5b1d0f2e4a"
LEASE = 30.0
"""FLUX_MCP_LEASE_SECONDS: long, so a job taken over only once its lease lapsed (at least 3/4 of this after
the stopping replica's last heartbeat) is told apart from one handed over at the stop."""
PENDING = ("starting", "processing")


@dataclass
class ViaFake(AtlasFake):
    """The Atlas Cloud fake behind per-replica base URLs: `/via/<name>/...` is served as `/...`, and every
    submit and status request is noted with the replica that sent it and when (time.monotonic())."""

    gates: dict[str, threading.Event] = field(default_factory=dict)
    """nonce -> held: that call's submit creates its job at once, then answers only once the event is set."""
    submitted_by: dict[str, str] = field(default_factory=dict)
    """nonce -> the replica that sent its (accepted) submit."""
    polls: list[tuple[float, str, str]] = field(default_factory=list)
    """(arrival, replica, job id) per status request."""

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        via = None
        path = request.url.path
        if path.startswith("/via/"):
            _, _, via, rest = (path + "/").split("/", 3)
            request = httpx2.Request(request.method, request.url.copy_with(path="/" + rest.rstrip("/")),
                                     headers=request.headers, content=request.content)
            path = request.url.path
        arrived = time.monotonic()
        response = await super().handle(request)
        if via and path.startswith("/api/v1/model/prediction/"):
            self.polls.append((arrived, via, path.rsplit("/", 1)[-1]))
        elif via and path == "/api/v1/model/generateImage" and response.status_code == 200:
            nonce = nonce_of(str(json.loads(request.content).get("prompt", "")))
            if nonce:
                self.submitted_by[nonce] = via
                gate = self.gates.get(nonce)
                while gate is not None and not gate.is_set():
                    await anyio.sleep(0.01)
        return response

    def job_of(self, nonce: str) -> Any:
        return next((j for j in self.jobs.values() if nonce in str(j.body.get("prompt"))), None)


@pytest.fixture(scope="module")
def fake() -> Iterator[ViaFake]:
    provider = ViaFake(key=ATLAS_KEY, hold=True)
    with serve_on_loopback(provider) as url:
        provider.url = url  # type: ignore[attr-defined]
        yield provider
        for job in provider.jobs.values():
            job.done = True


@pytest.fixture(scope="module")
def cluster(cluster_services: tuple[Any, Any], fake: ViaFake,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    pg, s3 = cluster_services
    database = pg.create_database("rolling")
    try:
        with Cluster(tmp_path_factory.mktemp("rolling"), pg.url(database), s3.env(s3.create_bucket()),
                     fake.url, ATLAS_KEY, {"alice": ALICE},  # type: ignore[attr-defined]
                     env={"FLUX_MCP_LOG_LEVEL": "INFO", "FLUX_MCP_LEASE_SECONDS": f"{LEASE:g}"},
                     provider_via=True) as running:
            yield running
    finally:
        pg.drop_database(database)


@dataclass
class Call:
    nonce: str
    key: str
    status: str | None = None
    error: str | None = None
    cuts: int = 0
    result: dict[str, Any] = field(default_factory=dict)


async def _one(http: httpx2.AsyncClient, url: str, tool: str, args: dict[str, Any], call: Call) -> dict[str, Any]:
    """One tool call, re-issued as it was (same arguments, so the same key) whenever it is cut."""
    while True:
        try:
            return (await call_tool(http, url, ALICE, tool, args)).result
        except Cut:
            call.cuts += 1
            await anyio.sleep(0.05)


async def _run(url: str, call: Call, first: str | None = None) -> None:
    """A client's call: generate_image with its key (first sent to `first` when given, re-issued to `url`), then
    check_prediction until the job is final."""
    args = {"prompt": with_nonce("a rolling harbour", call.nonce), "idempotency_key": call.key}
    async with httpx2.AsyncClient(timeout=120, trust_env=False) as http:
        try:
            result = (await call_tool(http, first, ALICE, "generate_image", args)).result if first else None
        except Cut:
            call.cuts += 1
            result = None
        if result is None:
            result = await _one(http, url, "generate_image", args, call)
        while True:
            data = result.get("structuredContent") or {}
            call.status, call.result = data.get("status"), data
            if result.get("isError"):
                call.error = " ".join(b.get("text", "") for b in result.get("content", []))
                return
            if call.status not in PENDING:
                return
            result = await _one(http, url, "check_prediction", {"prediction_id": data["prediction_id"]}, call)


async def _until(found: Any, limit: float) -> Any:
    with anyio.fail_after(limit):
        while not (value := found()):
            await anyio.sleep(0.02)
    return value


async def test_a_rolling_restart_cuts_no_call_and_hands_each_waiting_job_over_at_once(
        cluster: Cluster, fake: ViaFake) -> None:
    calls = [Call(new_nonce(), f"roll-{new_nonce()}") for _ in range(6)]
    handed: dict[str, list[float]] = {}
    with anyio.fail_after(240):
        async with anyio.create_task_group() as tg:
            for c in calls:
                tg.start_soon(_run, cluster.url, c)
            # Every job submitted and being polled (so journaled, each on the replica that submitted it).
            await _until(lambda: all(fake.job_of(c.nonce) is not None and fake.job_of(c.nonce).polls > 0
                                     for c in calls), 60)
            for replica in [r.name for r in cluster.replicas]:
                # The jobs it drives now: the ones it polled last (a pending job is polled by its lease's holder).
                last = {jid: via for _, via, jid in fake.polls}
                waiting = [job for job, via in last.items() if via == replica]
                # A call straight to it whose submit the provider holds: the stop waits for that answer, and
                # calls keep arriving through haproxy meanwhile.
                held = Call(new_nonce(), f"held-{new_nonce()}")
                fake.gates[held.nonce] = threading.Event()
                calls.append(held)
                tg.start_soon(_run, cluster.url, held, cluster.by_name(replica).url)
                await _until(lambda: fake.submitted_by.get(held.nonce) == replica, 30)
                sent = cluster.terminate(replica)
                await _until(lambda: "stopping (SIGTERM): waiting up to" in cluster.by_name(replica).log_text(), 30)
                # New calls go to the others: none is refused by the stopping replica (each one's job is made).
                late = [Call(new_nonce(), f"late-{new_nonce()}") for _ in range(4)]
                calls += late
                for c in late:
                    tg.start_soon(_run, cluster.url, c)
                await _until(lambda: all(fake.job_of(c.nonce) is not None or c.error for c in late), 30)
                fake.gates[held.nonce].set()
                waiting.append(fake.job_of(held.nonce).id)

                def taken_over() -> bool:
                    return all(any(t >= sent and via != replica and jid == job for t, via, jid in fake.polls)
                               for job in waiting)

                # Handed over at the stop, not left to lapse: well inside the lease (a lapsed lease is taken
                # over no sooner than 3/4 of LEASE after the last heartbeat, here 22.5 s after the signal).
                await _until(taken_over, LEASE / 2)
                for job in waiting:
                    handed[job] = [t - sent for t, via, jid in fake.polls if jid == job and t >= sent
                                   and via != replica][:1]
                assert await anyio.to_thread.run_sync(cluster.stopped, replica) == 0
                cluster.restart(replica)
                await anyio.to_thread.run_sync(lambda: cluster.wait_routed_to_all(limit=60))
            await _until(lambda: all(fake.job_of(c.nonce) is not None or c.error for c in calls), 60)
            for c in calls:
                if (job := fake.job_of(c.nonce)) is not None:
                    fake.finish(job.id)
    assert [(c.status, c.error) for c in calls] == [("succeeded", None)] * len(calls)
    assert handed and all(len(first) == 1 for first in handed.values())
    assert sum(c.cuts for c in calls) >= 1  # a call still waiting when its replica's stop ran out was cut...
    counts = submits_per_nonce(fake.ledger)
    assert all(counts[c.nonce] == 1 for c in calls)  # ...and its re-issue attached to its job: paid once
    assert len({c.result["prediction_id"] for c in calls}) == len(calls)
