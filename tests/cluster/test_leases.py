"""Several replicas on one PostgreSQL database, in one process: two (or three) `FluxService`s, each with its
own `PgJournal` (its own pool and lease owner) and its own `Replica` (heartbeat, reconciler, LISTEN), on one
database and one bucket, with the Atlas Cloud fake behind each one's MockTransport.

A replica "dies" here by running no heartbeat (its leases lapse) while its call is stuck on a gated
request to the fake; opening the gate later makes it the stalled replica that wakes up past its lease.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from flux_mcp.backends import open_store
from flux_mcp.config import Settings
from flux_mcp.errors import UnknownPrediction
from flux_mcp.jobs import Outcome
from flux_mcp.journal import Record
from flux_mcp.journal_pg import PgJournal
from flux_mcp.paths import PathPolicy
from flux_mcp.replica import LeaseLost, Replica
from flux_mcp.request import JobRequest
from flux_mcp.service import FluxService
from tests.cluster_env import kept_bytes
from tests.conftest import ATLAS_BASE, ATLAS_KEY, FAST_RETRY, pg_env
from tests.fakes.atlascloud import AtlasFake

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

SUBMIT = "POST /api/v1/model/generateImage"
POLL = "GET /api/v1/model/prediction/"


@dataclass
class Gate:
    """Holds the requests of one replica that start with `line` until `open` is set."""

    line: str
    open: anyio.Event = field(default_factory=anyio.Event)
    arrived: anyio.Event = field(default_factory=anyio.Event)
    count: int = 0

    def holds(self, request: httpx2.Request) -> bool:
        return f"{request.method} {request.url.path}".startswith(self.line)


@dataclass
class Node:
    """One replica: its service, journal, replica tasks (None: a replica that runs no heartbeat)."""

    service: FluxService
    journal: PgJournal
    replica: Replica | None
    paths: PathPolicy
    sent: list[str]
    """Every request this replica sent to the provider, as "METHOD /path"."""

    async def run(self, prompt: str = "a red fox", principal: str = "alice", **kw: Any) -> Outcome:
        out = await self.service.run(JobRequest(prompt=prompt, **kw), self.paths, principal=principal)
        assert isinstance(out, Outcome)
        return out

    async def check(self, pid: str, wait: float = 0, principal: str = "alice") -> Outcome:
        return await self.service.check(pid, wait, self.paths, principal=principal)


@pytest.fixture
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


@pytest.fixture
def fake() -> AtlasFake:
    return AtlasFake(key=ATLAS_KEY, hold=True)


@pytest.fixture
def make_node(shared_env: dict[str, str], fake: AtlasFake, tmp_path: Path
              ) -> Callable[..., contextlib.AbstractAsyncContextManager[Node]]:
    @contextlib.asynccontextmanager
    async def make(*, lease: float = 2.0, heartbeat: bool = True, gate: Gate | None = None,
                   pool: int = 10) -> AsyncIterator[Node]:
        settings = Settings.from_env({"FLUX_MCP_HOME": str(tmp_path / "home"), "ATLASCLOUD_API_KEY": ATLAS_KEY,
                                      "ATLASCLOUD_BASE_URL": ATLAS_BASE, **shared_env}, cwd=tmp_path)

        sent: list[str] = []

        async def handle(request: httpx2.Request) -> httpx2.Response:
            sent.append(f"{request.method} {request.url.path}")
            if gate is not None and gate.holds(request):
                gate.count += 1
                gate.arrived.set()
                await gate.open.wait()
            return await fake.handle(request)

        journal = await PgJournal.open(shared_env["FLUX_MCP_DATABASE_URL"], lease_seconds=lease, max_size=pool)
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(handle))
        service = FluxService(settings, http, journal, store=open_store(settings), retry=FAST_RETRY)
        paths = PathPolicy([], settings.home)
        replica = Replica(journal, service.runner, service.providers, paths) if heartbeat else None
        if replica is not None:
            await replica.start()
        try:
            yield Node(service, journal, replica, paths, sent)
        finally:
            if gate is not None:
                gate.open.set()  # a stalled call ends with the test
            if replica is not None:
                await replica.stop()
            await journal.close()
            await http.aclose()

    return make


async def until(predicate: Callable[[], Any], limit: float = 20.0) -> None:
    """Returns once `predicate()` (sync or async) is true; fails after `limit` seconds."""
    with anyio.fail_after(limit):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await anyio.sleep(0.02)


async def row(node: Node, pid: str) -> Record:
    got = await node.journal.get(pid)
    assert got is not None
    return got


def native(pid: str) -> str:
    return pid.partition(":")[2]


# --- intent before the paid request; the idempotency key across replicas ----------------------------------

async def test_a_key_being_submitted_on_one_replica_is_attached_to_on_another_never_submitted_twice(
        make_node, fake: AtlasFake):
    gate = Gate(SUBMIT)
    async with make_node(gate=gate) as a, make_node() as b, anyio.create_task_group() as tg:
        first: list[Outcome] = []

        async def on_a() -> None:
            first.append(await a.run(idempotency_key="k-1", wait_seconds=20))

        tg.start_soon(on_a)
        await until(gate.arrived.is_set)  # a's paid request is out, its answer not yet in
        second: list[Outcome] = []

        async def on_b() -> None:
            second.append(await b.run(idempotency_key="k-1", wait_seconds=20))

        tg.start_soon(on_b)
        await until(lambda: b.journal.waits.waiting > 0)  # b attached to a's job and waits on its row
        gate.open.set()
        await until(lambda: fake.jobs)
        fake.finish(next(iter(fake.jobs)))
    assert gate.count == 1 and len(fake.ledger) == 1
    assert first[0].record.status == second[0].record.status == "succeeded"
    assert second[0].record.id == first[0].record.id and second[0].joined
    assert [i.path for i in second[0].record.images] == [i.path for i in first[0].record.images]


async def test_concurrent_intents_with_one_key_on_two_journals_let_exactly_one_through(make_node):
    async with make_node(heartbeat=False) as a, make_node(heartbeat=False) as b:
        results: list[Record | None] = []

        async def intend(node: Node, i: int) -> None:
            rec = Record(id=f"atlascloud:intent-{i:04d}", provider="atlascloud", native_id="", model="m",
                         kind="generate", status="starting", request={"prompt": "p"}, principal="alice",
                         request_key="rk", idempotency_key="same")
            results.append(await node.journal.intent(rec))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(intend, a if i % 2 else b, i)
    landed = [r for r in results if r is None]
    holders = {r.id for r in results if r is not None}
    assert len(landed) == 1 and len(holders) == 1  # every other call was handed the one job holding the key


async def test_a_submit_without_an_answer_leaves_its_key_on_an_unknown_job_and_a_refused_one_frees_it(
        make_node, fake: AtlasFake):
    from flux_mcp.errors import ProviderError, SubmitOutcomeUnknown
    from tests.fakes.base import RESET

    async with make_node() as a, make_node() as b:
        fake.submit_errors.append(RESET)  # the request reached the provider; the connection broke before the answer
        with pytest.raises(SubmitOutcomeUnknown):
            await a.run(idempotency_key="k-reset", wait_seconds=5)
        again = await b.run(idempotency_key="k-reset", wait_seconds=5)
        fake.submit_errors.append((400, {"code": 400, "message": "prompt is required"}, {}))  # provably refused
        with pytest.raises(ProviderError):
            await a.run(idempotency_key="k-refused", wait_seconds=5)
        fake.hold = False
        retried = await b.run(idempotency_key="k-refused", wait_seconds=5)
    assert again.joined and again.record.status == "unknown" and fake.count(SUBMIT) == 3
    assert not retried.joined and retried.record.status == "succeeded" and len(fake.ledger) == 1


# --- a replica that dies: before the provider answered (unknown), after it (taken over) --------------------

async def test_a_replica_dying_before_the_answer_leaves_unknown_which_is_never_resubmitted_and_a_late_answer_revives(
        make_node, fake: AtlasFake):
    gate = Gate(SUBMIT)
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        late: list[Outcome] = []

        async def on_a() -> None:
            late.append(await a.run(idempotency_key="k-2", wait_seconds=30))

        tg.start_soon(on_a)
        await until(gate.arrived.is_set)
        [intent_id] = list(a.journal._held)

        async def unknown_listed() -> bool:
            rows = await b.journal.search(principal="alice", query=None, provider=None, status=None, since=None,
                                          limit=10, before=None)
            return [r.status for r in rows] == ["unknown"]

        await until(unknown_listed)  # a's lease lapsed: b's reconciler reported the job unknown
        looked = await b.check(intent_id, wait=5)
        again = await b.run(idempotency_key="k-2", wait_seconds=5)
        keyless = await b.run(wait_seconds=5)  # the same arguments without the key: rejoins, never resubmits
        assert looked.record.status == again.record.status == keyless.record.status == "unknown"
        assert again.joined and keyless.joined and "never resubmitted" in (looked.record.error or "")
        assert gate.count == 1 and fake.ledger == []
        # a was only stalled: its answer arrives after all, the id is written and the job continues.
        gate.open.set()
        await until(lambda: fake.jobs)
        fake.finish(next(iter(fake.jobs)))
        await until(lambda: late)
        revived = await b.check(intent_id)
    assert late[0].record.status == "succeeded" and revived.record.id == late[0].record.id
    assert revived.record.status == "succeeded" and kept_bytes(revived.record.images[0].path or "")
    assert gate.count == 1 and len(fake.ledger) == 1


async def test_a_replica_dying_after_the_answer_is_taken_over_finished_once_and_its_late_write_is_fenced(
        make_node, fake: AtlasFake, shared_env: dict[str, str]):
    gate = Gate(POLL)
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        stalled: list[Outcome] = []

        async def on_a() -> None:
            stalled.append(await a.run(idempotency_key="k-3", wait_seconds=60))

        tg.start_soon(on_a)
        await until(gate.arrived.is_set)  # the job exists and a is stuck on its first status request
        [pid] = [f"atlascloud:{j}" for j in fake.jobs]
        fake.finish(native(pid))
        await until(lambda: b.replica is not None and b.replica.takeovers == 1)
        await until(lambda: b.journal.get(pid), 5)
        await until(lambda: _status(b, pid, "succeeded"))
        finished = await row(b, pid)
        reissued = await b.run(idempotency_key="k-3", wait_seconds=5)
        gate.open.set()  # a wakes up past its lease, sees the job done and tries to write it
        await until(lambda: stalled)
        after = await row(b, pid)
    assert reissued.joined and reissued.record.id == pid and reissued.record.status == "succeeded"
    assert len(fake.ledger) == 1  # taken over, re-issued: still one paid job
    assert after == finished  # the stalled replica's write changed nothing
    assert stalled[0].record.status == "succeeded" and stalled[0].record.images == finished.images
    keys = [k for k in _bucket_keys(shared_env) if not k.endswith(".json")]
    assert len(keys) == 1 and kept_bytes(finished.images[0].path or "")  # one winner, one object


async def test_a_stalled_owners_write_is_dropped_once_another_replica_holds_the_job(make_node):
    async with make_node(heartbeat=False, lease=0.5) as a, make_node(heartbeat=False) as b:
        rec = Record(id="atlascloud:intent-fence", provider="atlascloud", native_id="", model="m", kind="generate",
                     status="starting", request={"prompt": "p"}, principal="alice")
        assert await a.journal.intent(rec) is None
        job = Record(id="atlascloud:job-fence", provider="atlascloud", native_id="job-fence", model="m",
                     kind="generate", status="processing", request={"prompt": "p"}, principal="alice")
        assert await a.journal.submitted(rec.id, job)
        await until(lambda: b.journal.claim_lapsed(5), 10)  # a's lease lapsed: b holds the job (epoch + 1)
        done = job.copy()
        done.status, done.error = "failed", "the new owner's answer"
        assert await b.journal.put(done)
        late = job.copy()
        late.status, late.error = "succeeded", "the stalled owner's answer"
        with pytest.raises(LeaseLost):
            await a.journal.put(late)
        assert not a.journal.holds(job.id)
        kept = await _read(b, job.id)
    assert kept.status == "failed" and kept.error == "the new owner's answer"


# --- waiting across replicas ---------------------------------------------------------------------------

async def test_hundreds_of_calls_waiting_on_another_replicas_job_need_only_a_few_connections(
        make_node, fake: AtlasFake):
    async with make_node() as a, make_node(pool=2) as b, anyio.create_task_group() as tg:
        made: list[Outcome] = []

        async def on_a() -> None:
            made.append(await a.run(wait_seconds=60))

        tg.start_soon(on_a)
        await until(lambda: fake.jobs)
        pid = f"atlascloud:{next(iter(fake.jobs))}"
        await until(lambda: a.journal.get(pid), 5)
        answers: list[Outcome] = []

        async def wait_on_b() -> None:
            answers.append(await b.check(pid, wait=60))

        for _ in range(300):
            tg.start_soon(wait_on_b)
        await until(lambda: b.journal.waits.waiting == 300)
        fake.finish(native(pid))
    assert b.sent == []  # b asked the provider nothing: its calls waited for a's row
    assert len(answers) == 300 and {o.record.status for o in answers} == {"succeeded"}
    assert {o.record.images[0].path for o in answers} == {made[0].record.images[0].path}
    assert len(fake.ledger) == 1


async def test_waits_finish_within_a_second_of_completion_while_the_listen_connection_is_cut(
        make_node, fake: AtlasFake, cluster_services, shared_env: dict[str, str]):
    import psycopg

    async with make_node() as a, make_node() as b, anyio.create_task_group() as tg:
        assert b.replica is not None
        await until(b.replica.listening.is_set)
        done: list[float] = []

        async def on_a() -> None:
            await a.run(wait_seconds=60)
            done.append(time.monotonic())

        tg.start_soon(on_a)
        await until(lambda: fake.jobs)
        pid = f"atlascloud:{next(iter(fake.jobs))}"
        await until(lambda: a.journal.get(pid), 5)
        answered: list[tuple[float, str]] = []

        async def wait_on_b() -> None:
            outcome = await b.check(pid, wait=60)
            answered.append((time.monotonic(), outcome.record.status))

        for _ in range(20):
            tg.start_soon(wait_on_b)
        await until(lambda: b.journal.waits.waiting == 20)
        url = shared_env["FLUX_MCP_DATABASE_URL"]
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            cut = anyio.Event()

            async def keep_cutting() -> None:  # b's LISTEN connection is killed, and again each time it is back
                while not answered or len(answered) < 20:
                    cur = await admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                        (b.replica.listen_name,))
                    row_ = await cur.fetchone()
                    if row_ and row_[0]:
                        cut.set()
                    await anyio.sleep(0.02)

            tg.start_soon(keep_cutting)
            await until(cut.is_set)
            fake.finish(native(pid))
            await until(lambda: done, 30)
            with anyio.fail_after(2.0):  # a second between re-reads, plus scheduling on a busy machine
                while len(answered) < 20:
                    await anyio.sleep(0.01)
    assert {s for _, s in answered} == {"succeeded"}
    assert max(t for t, _ in answered) - done[0] <= 2.0


async def test_another_users_job_is_not_found_on_any_replica_also_while_it_is_being_submitted(
        make_node, fake: AtlasFake):
    gate = Gate(SUBMIT)
    async with make_node(gate=gate) as a, make_node() as b, anyio.create_task_group() as tg:
        tg.start_soon(lambda: a.run(wait_seconds=0))
        await until(gate.arrived.is_set)
        [intent_id] = list(a.journal._held)
        with pytest.raises(UnknownPrediction):
            await b.check(intent_id, principal="bob")
        assert (await b.check(intent_id, principal="alice")).record.status == "starting"
        gate.open.set()
        await until(lambda: fake.jobs)
        pid = f"atlascloud:{next(iter(fake.jobs))}"
        await until(lambda: b.journal.get(pid), 5)
        with pytest.raises(UnknownPrediction):
            await b.check(pid, principal="bob")
        with pytest.raises(UnknownPrediction):
            await b.check(intent_id, principal="bob")


async def test_a_replica_that_stops_hands_its_jobs_over_at_once_not_after_its_lease(make_node, fake: AtlasFake):
    gate = Gate(POLL)
    async with make_node(lease=30.0, gate=gate) as a, make_node() as b, anyio.create_task_group() as tg:
        tg.start_soon(lambda: a.run(wait_seconds=60))
        await until(gate.arrived.is_set)
        [pid] = [f"atlascloud:{j}" for j in fake.jobs]
        fake.finish(native(pid))
        assert a.replica is not None
        stopped = time.monotonic()
        await a.replica.stop()
        await until(lambda: _status(b, pid, "succeeded"), 5)  # far sooner than the 30 s lease
        handover = time.monotonic() - stopped
        gate.open.set()
    assert handover < 5 and len(fake.ledger) == 1


async def test_a_stopping_replica_hands_over_the_jobs_of_the_calls_it_cuts(make_node, fake: AtlasFake, monkeypatch):
    from flux_mcp.lifecycle import inflight

    async with make_node(lease=30.0) as a, make_node() as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: a.run(wait_seconds=60))
            await until(lambda: fake.count(POLL) >= 1)
            [pid] = [f"atlascloud:{j}" for j in fake.jobs]
            monkeypatch.setattr(inflight, "stopping", True)  # the server is stopping: its calls are cut
            tg.cancel_scope.cancel()
        assert a.replica is not None
        await a.replica.stop()  # then its lifespan ends
        monkeypatch.setattr(inflight, "stopping", False)
        fake.finish(native(pid))
        await until(lambda: _status(b, pid, "succeeded"), 10)  # taken over at once, not after the 30 s lease
    assert b.replica is not None and b.replica.takeovers >= 1 and len(fake.ledger) == 1


# --- helpers --------------------------------------------------------------------------------------------

async def _status(node: Node, pid: str, status: str) -> bool:
    got = await node.journal.get(pid)
    return got is not None and got.status == status and (status != "succeeded" or bool(got.images))


async def _read(node: Node, pid: str) -> Record:
    got = await node.journal.get(pid)
    assert got is not None
    return got


def _bucket_keys(env: dict[str, str]) -> list[str]:
    from tests.cluster_env import RUNNING

    return RUNNING[0].keys(env["FLUX_MCP_S3_URL"].removeprefix("s3://"))


# --- a polled success: one write, with its images and its cost ------------------------------------------

async def test_a_polled_success_is_written_once_with_its_images_and_cost_and_a_crash_before_leaves_it_to_another(
        make_node, fake: AtlasFake, shared_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """The write that says a polled job succeeded is the one that says its images are kept (and settles its charge
    to the provider's cost): until it lands the row stays pending under the owner's lease. So a replica that dies
    while storing the images leaves a job another replica polls and keeps once, and the dead one's late write (and
    settle) is fenced out."""
    import obstore

    fake.price = 0.0042  # the provider's own figure, unlike the price table's estimate
    storing, resume = anyio.Event(), anyio.Event()
    real_put = obstore.put_async
    puts: list[str] = []

    async def put(*args: Any, **kw: Any) -> Any:
        puts.append(str(args[1]))
        if len(puts) == 1:  # the first replica's PUT: it "dies" here (no heartbeat, stuck)
            storing.set()
            await resume.wait()
        return await real_put(*args, **kw)

    monkeypatch.setattr(obstore, "put_async", put)
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    async with make_node(heartbeat=False, lease=1.0) as a, anyio.create_task_group() as tg:
        stalled: list[Outcome] = []

        async def on_a() -> None:
            stalled.append(await a.run(idempotency_key="k-poll", wait_seconds=60))

        tg.start_soon(on_a)
        await until(lambda: fake.jobs)
        [job] = fake.jobs
        pid = f"atlascloud:{job}"
        fake.finish(job)
        await until(storing.is_set)
        # The crash point: the provider said succeeded, the image is being stored. The row says neither.
        [(status, owner, charge)] = await _pg(url, "SELECT p.status, p.lease_owner, c.state || ' ' || c.estimated "
                                                   "FROM flux_predictions p JOIN flux_charges c ON "
                                                   f"c.prediction_id = p.id WHERE p.id = '{pid}'")
        assert status in ("starting", "processing") and (owner, charge) == (a.journal.owner, "billed true")
        async with make_node() as b:  # its reconciler takes the lapsed lease over
            await until(lambda: _status(b, pid, "succeeded"))
            finished = await _read(b, pid)
            resume.set()  # the stalled replica wakes up past its lease: its write (and settle) must not land
            await until(lambda: stalled)
            after = await _read(b, pid)
    assert len(fake.ledger) == 1, "paid twice"
    assert after == finished and stalled[0].record.status == "succeeded"
    assert stalled[0].record.images == finished.images
    charges = await _pg(url, "SELECT state, prediction_id, usd, estimated FROM flux_charges")
    assert charges == [("billed", pid, 0.0042, False)], "the charge is billed once, at the provider's cost"
    assert kept_bytes(finished.images[0].path or "") is not None


async def _pg(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())
