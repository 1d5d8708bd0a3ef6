"""Three replicas of the real command behind haproxy (deploy/haproxy.cfg), on one PostgreSQL database and
one bucket: any replica answers any call, they migrate a fresh database once, and a replica SIGKILLed in
the middle of a call loses nothing and pays nothing twice — re-issued with its key it is paid once; killed
before the provider answered, the job is `unknown` and never resubmitted; killed after, a survivor takes
the job over once its lease lapses and finishes it with nobody calling again. The client is the mcp SDK's
streamable-HTTP client; the provider is the Atlas Cloud fake on loopback, which counts accepted submits per
call (the prompt's nonce). Every wait is bounded with `anyio.fail_after`; none is an assertion on
wall-clock time."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import pytest

from flux_mcp.journal_pg import SCHEMA_VERSION
from tests.cluster.replicas import (
    Cluster,
    call_tool,
    new_nonce,
    nonce_of,
    sdk_client,
    submits_per_nonce,
    with_nonce,
)
from tests.cluster_env import kept_bytes
from tests.conftest import ATLAS_KEY, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import serve_on_loopback

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.subprocess]
ALICE = "alice-token-5d1e9a3c7b2f-4e8a0c6d2b9f1a7e"
LEASE = 2
"""FLUX_MCP_LEASE_SECONDS of the replicas: how soon a dead replica's jobs are taken over."""


@dataclass
class GatedAtlasFake(AtlasFake):
    """The Atlas Cloud fake, able to hold a submit's answer: a submit whose prompt carries a gated nonce
    creates its job at once, then answers only once the test opens the gate (`arrived` tells it came)."""

    gates: dict[str, threading.Event] = field(default_factory=dict)
    arrived: set[str] = field(default_factory=set)

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle(request)
        if request.method == "POST" and request.url.path == "/api/v1/model/generateImage":
            nonce = nonce_of(str(json.loads(request.content).get("prompt", "")))
            gate = self.gates.get(nonce or "")
            if gate is not None and response.status_code == 200:
                self.arrived.add(str(nonce))
                while not gate.is_set():
                    await anyio.sleep(0.01)
        return response


@pytest.fixture(scope="module")
def provider() -> Iterator[GatedAtlasFake]:
    """The Atlas Cloud fake on 127.0.0.1 (one for the module's cluster); its base URL in `.url`."""
    fake = GatedAtlasFake(key=ATLAS_KEY)
    with serve_on_loopback(fake) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture(scope="module")
def database(cluster_services: tuple[Any, Any]) -> Iterator[str]:
    """A fresh, empty database: the replicas migrate it."""
    pg, _ = cluster_services
    name = pg.create_database("replicas")
    try:
        yield name
    finally:
        pg.drop_database(name)


@pytest.fixture(scope="module")
def cluster(cluster_services: tuple[Any, Any], database: str, provider: AtlasFake,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three replicas started at the same moment on `database`, haproxy in front."""
    pg, s3 = cluster_services
    with Cluster(tmp_path_factory.mktemp("replicas"), pg.url(database), s3.env(s3.create_bucket()),
                 provider.url, ATLAS_KEY, {"alice": ALICE},  # type: ignore[attr-defined]
                 env={"FLUX_MCP_LOG_LEVEL": "INFO", "FLUX_MCP_LEASE_SECONDS": str(LEASE)}) as running:
        yield running


@pytest.fixture
def fake(provider: GatedAtlasFake) -> Iterator[GatedAtlasFake]:
    provider.hold = False
    yield provider
    provider.hold = False
    for gate in provider.gates.values():
        gate.set()
    for job in provider.jobs.values():  # nothing left running for the next test's replicas to poll
        job.done = True


def _job_of(fake: AtlasFake, nonce: str, *, polled: bool = False) -> Any:
    """The fake's job for the call with `nonce` (polled: once a replica has asked about it, i.e. journaled it)."""
    return next((j for j in fake.jobs.values() if nonce in str(j.body.get("prompt"))
                 and (j.polls > 0 or not polled)), None)


async def _until(found: Any, what: str, limit: float = 20) -> Any:
    """Waits (bounded) until `found()` returns something."""
    with anyio.fail_after(limit):
        while (value := found()) is None:
            await anyio.sleep(0.02)
    return value



async def test_three_replicas_started_at_once_on_a_fresh_database_migrate_it_once(
        cluster: Cluster, cluster_services: tuple[Any, Any], database: str) -> None:
    pg, _ = cluster_services
    versions = pg.psql("SELECT version FROM flux_schema ORDER BY version", database).split()
    assert versions == [str(v) for v in range(1, SCHEMA_VERSION + 1)]
    # Each step was applied by exactly one of them (the others found it done under the lock).
    steps = [int(m) for r in cluster.replicas for m in re.findall(r"migrated to schema (\d+)", r.log_text())]
    assert sorted(steps) == list(range(1, SCHEMA_VERSION + 1))
    async with httpx2.AsyncClient(timeout=10, trust_env=False) as http:
        ready = [(await http.get(f"{r.url}/readyz")).json() for r in cluster.replicas]
    assert ready == [{"status": "ready", "database": "ok", "bucket": "ok"}] * 3


async def test_any_replica_answers_any_call_made_through_haproxy(cluster: Cluster, fake: AtlasFake) -> None:
    served: list[str] = []
    nonce = new_nonce()
    with anyio.fail_after(60):
        async with sdk_client(cluster.url, ALICE, served) as client:
            made = await client.call_tool("generate_image", {"prompt": with_nonce("a harbour", nonce)})
        assert made.structured_content["status"] == "succeeded", text_of(made)
        pid = made.structured_content["prediction_id"]
        answers = []
        for r in cluster.replicas:  # straight to each replica, then through haproxy again
            async with sdk_client(r.url, ALICE) as client:
                answers.append(await client.call_tool("check_prediction", {"prediction_id": pid}))
        async with sdk_client(cluster.url, ALICE, served) as client:
            answers.append(await client.call_tool("check_prediction", {"prediction_id": pid}))
        async with httpx2.AsyncClient(timeout=10, trust_env=False) as http:
            links = [a.structured_content["images"][0]["url"] for a in answers]
            downloads = [await http.get(link) for link in links]
    # One session's requests went to different replicas (stateless: no replica holds the session).
    assert len(set(served)) >= 2
    assert [a.structured_content["status"] for a in answers] == ["succeeded"] * 4
    assert {a.structured_content["prediction_id"] for a in answers} == {pid}
    stored = kept_bytes(made.structured_content["images"][0]["path"])
    assert stored is not None and stored.startswith(b"\x89PNG")
    assert all(d.status_code == 200 and d.content == stored for d in downloads)
    assert submits_per_nonce(fake.ledger)[nonce] == 1


async def test_a_replica_killed_mid_call_and_the_call_reissued_with_its_key_pays_once(
        cluster: Cluster, fake: AtlasFake, cluster_services: tuple[Any, Any], database: str) -> None:
    pg, _ = cluster_services
    fake.hold = True  # jobs stay processing until finished below
    nonce, key = new_nonce(), f"key-{new_nonce()}"
    args = {"prompt": with_nonce("a red kite", nonce), "idempotency_key": key}
    first: list[BaseException | Any] = []

    async def call_once() -> None:
        try:
            async with sdk_client(cluster.url, ALICE) as client:
                first.append(await client.call_tool("generate_image", args))
        except Exception as exc:  # the cut: the SDK client raises when the stream breaks
            first.append(exc)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_once)
            job = await _until(lambda: _job_of(fake, nonce, polled=True), "the job journaled and polled")
            victim = await _until(lambda: cluster.holding(job.id), "the replica that submitted it")
            cluster.kill(victim.name)
        assert len(first) == 1 and isinstance(first[0], Exception), first  # the call got no answer
        fake.finish(job.id)
        served: list[str] = []
        async with sdk_client(cluster.url, ALICE, served) as client:  # the client re-issues the call
            again = await client.call_tool("generate_image", args)
    try:
        data = again.structured_content
        assert data["status"] == "succeeded", text_of(again)
        assert data["prediction_id"] == f"atlascloud:{job.id}"
        assert victim.name not in served  # answered by a survivor
        assert submits_per_nonce(fake.ledger)[nonce] == 1  # one submit at the provider, for two calls
        assert kept_bytes(data["images"][0]["path"]) is not None
        rows = cluster.rows(pg.psql, database, f"idempotency_key = '{key}'")
        assert [(r["id"], r["status"]) for r in rows] == [(data["prediction_id"], "succeeded")]
    finally:
        cluster.restart(victim.name)



async def test_a_replica_answers_more_simultaneous_calls_from_one_address_than_the_session_limit(
        cluster: Cluster, fake: AtlasFake) -> None:
    # Behind a load balancer every call reaches a replica from the balancer's address, and stateless calls open
    # no session: the per-address session limit (FLUX_MCP_SESSIONS_PER_CLIENT, 32 by default) must not refuse them.
    fake.hold = True
    nonces = [new_nonce() for _ in range(40)]
    answers: list[Any] = []
    replica = cluster.replicas[0]

    async def one(http: httpx2.AsyncClient, nonce: str) -> None:
        answers.append(await call_tool(http, replica.url, ALICE, "generate_image",
                                       {"prompt": with_nonce("a kite", nonce)}))

    with anyio.fail_after(60):
        async with httpx2.AsyncClient(timeout=60, trust_env=False) as http, anyio.create_task_group() as tg:
            for nonce in nonces:
                tg.start_soon(one, http, nonce)
            # All 40 are in progress at once: each one's job was submitted and is being polled.
            jobs = await _until(lambda: (found if len(found := [j for n in nonces
                                                                if (j := _job_of(fake, n, polled=True))]) == 40
                                         else None), "40 jobs polled")
            for job in jobs:
                fake.finish(job.id)
    assert [a.result["structuredContent"]["status"] for a in answers] == ["succeeded"] * 40
    assert all(submits_per_nonce(fake.ledger)[n] == 1 for n in nonces)


async def _cut_call(cluster: Cluster, args: dict[str, Any], first: list[Any]) -> None:
    """One call through haproxy that is expected to be cut (its replica is killed meanwhile)."""
    try:
        async with sdk_client(cluster.url, ALICE) as client:
            first.append(await client.call_tool("generate_image", args))
    except Exception as exc:  # the cut: the SDK client raises when the stream breaks
        first.append(exc)


def _row(cluster: Cluster, psql: Any, database: str, key: str) -> dict[str, Any] | None:
    rows = cluster.rows(psql, database, f"idempotency_key = '{key}'")
    return rows[0] if len(rows) == 1 else None


async def test_a_replica_killed_before_the_provider_answered_has_its_job_found_in_the_history_never_resubmitted(
        cluster: Cluster, fake: GatedAtlasFake, cluster_services: tuple[Any, Any], database: str) -> None:
    pg, _ = cluster_services
    nonce, key = new_nonce(), f"key-{new_nonce()}"
    fake.gates[nonce] = threading.Event()  # the provider creates the job but holds its answer
    args = {"prompt": with_nonce("a blue heron", nonce), "idempotency_key": key}
    first: list[Any] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cut_call, cluster, args, first)
            await _until(lambda: nonce in fake.arrived or None, "the submit at the provider")
            # The intent row names the replica whose submit is out (host:pid:...).
            victim = await _until(lambda: cluster.owning((_row(cluster, pg.psql, database, key) or {})
                                                         .get("lease_owner")), "the submitting replica")
            cluster.kill(victim.name)
        fake.gates[nonce].set()  # the answer goes to a dead replica
        assert len(first) == 1 and isinstance(first[0], Exception), first
        served: list[str] = []
        async with sdk_client(cluster.url, ALICE, served) as client:  # the client re-issues, same key
            again = await client.call_tool("generate_image", args)
    try:
        data = again.structured_content
        # Another replica's reconciler found the job in the provider's history and finished it.
        assert data["status"] == "succeeded" and data["images"], text_of(again)
        assert victim.name not in served
        assert submits_per_nonce(fake.ledger)[nonce] == 1  # never resubmitted
        row = _row(cluster, pg.psql, database, key)
        assert row is not None and row["status"] == "succeeded" and row["id"] == data["prediction_id"]
    finally:
        cluster.restart(victim.name)


async def test_a_replica_killed_after_the_provider_answered_has_its_job_taken_over_and_finished(
        cluster: Cluster, fake: GatedAtlasFake, cluster_services: tuple[Any, Any], database: str) -> None:
    pg, _ = cluster_services
    fake.hold = True
    nonce, key = new_nonce(), f"key-{new_nonce()}"
    args = {"prompt": with_nonce("a grey seal", nonce), "idempotency_key": key}
    first: list[Any] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cut_call, cluster, args, first)
            job = await _until(lambda: _job_of(fake, nonce, polled=True), "the job journaled and polled")
            victim = await _until(lambda: cluster.owning((_row(cluster, pg.psql, database, key) or {})
                                                         .get("lease_owner")), "the replica driving it")
            cluster.kill(victim.name)
        assert len(first) == 1 and isinstance(first[0], Exception), first
        fake.finish(job.id)
        # Nobody calls again: a survivor claims the lapsed lease and finishes the job on its own.
        row = await _until(lambda: (r if (r := _row(cluster, pg.psql, database, key)) and r["status"] == "succeeded"
                                    else None), "the job finished by a survivor", limit=LEASE + 30)
        async with sdk_client(cluster.url, ALICE) as client:
            checked = await client.call_tool("check_prediction", {"prediction_id": row["id"]})
    try:
        assert row["id"] == f"atlascloud:{job.id}" and row["lease_epoch"] >= 1
        assert checked.structured_content["status"] == "succeeded", text_of(checked)
        assert kept_bytes(checked.structured_content["images"][0]["path"]) is not None
        assert submits_per_nonce(fake.ledger)[nonce] == 1
    finally:
        cluster.restart(victim.name)


async def test_one_users_burst_of_reservations_never_takes_every_pooled_connection(pg_env_one: str) -> None:
    # Every paid call of a user takes that user's ledger lock (so two replicas never both spend the last
    # dollar). A burst of one user's calls must wait for it without holding all the replica's pooled
    # connections: the heartbeat, lookups and other users' calls need one meanwhile.
    import uuid as _uuid

    import psycopg

    from flux_mcp.journal import Charge
    from flux_mcp.journal_pg import _LEDGER_LOCK, PgJournal

    journal = await PgJournal.open(pg_env_one, max_size=4, timeout=3)
    blocker = await psycopg.AsyncConnection.connect(pg_env_one, autocommit=True)
    try:
        # Another replica is in the middle of alice's reservation: it holds her lock.
        await blocker.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_LEDGER_LOCK, "alice"))
        done: list[object] = []

        async def reserve() -> None:
            charge = Charge(id=_uuid.uuid4().hex, principal="alice", provider="atlascloud", model="m", images=1,
                            usd=0.003)
            done.append(await journal.reserve(charge, {}, lambda totals: None))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(reserve)
                await anyio.sleep(0.5)  # let the burst queue up behind the lock (not an assertion)
                with anyio.fail_after(2):  # well inside the pool's 3 s timeout
                    assert await journal.get("atlascloud:pred_none") is None
                    assert await journal.by_idempotency_key("bob", "k") is None
                await blocker.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LEDGER_LOCK, "alice"))
        assert done == [None] * 20  # every reservation went through once the lock was free
    finally:
        await blocker.close()
        await journal.close()


@pytest.fixture
def pg_env_one(request: pytest.FixtureRequest) -> str:
    """A fresh, empty schema's database URL (the shared-mode fixtures' own)."""
    from tests.conftest import pg_env

    return pg_env(request)["FLUX_MCP_DATABASE_URL"]
