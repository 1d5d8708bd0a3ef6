"""Orphan adoption across replicas (in one process): a key-less re-issue of a call cut by its replica's death
attaches to that call's job instead of paying again, one re-issue per orphan, only for the same principal and
only within FLUX_MCP_REJOIN_SECONDS. Replica `a` "dies" by running no heartbeat while its calls are stuck on
a gated status request; replica `b`'s reconciler takes the jobs over (they become orphans) and finishes them.
"""

from __future__ import annotations

import anyio
import pytest

from flux_mcp.jobs import Outcome
from flux_mcp.request import JobRequest, request_key
from tests.cluster.test_leases import POLL, SUBMIT, Gate, Node, fake, make_node, shared_env, until  # noqa: F401
from tests.fakes.atlascloud import AtlasFake

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

PROMPT = "a red fox"


async def cut_calls(a: Node, b: Node, gate: Gate, fake: AtlasFake, tg: anyio.abc.TaskGroup, n: int) -> list[str]:
    """`n` identical key-less calls on `a`, cut by `a`'s death; returns their jobs once `b` took them over and
    the provider finished them."""
    for i in range(n):
        tg.start_soon(a.run, PROMPT, "alice")
        await until(lambda: len(a.service.runner.in_flight) > i)  # submitted: the next identical call is new
    await until(lambda: gate.count >= n)  # every call's job is out and being polled (stuck) on a
    await until(lambda: b.replica is not None and b.replica.takeovers >= n)  # a's leases lapsed: orphans now
    jobs = list(fake.jobs)
    assert len(jobs) == n
    for job in jobs:
        fake.finish(job)
    return [f"atlascloud:{j}" for j in jobs]


async def _kept(node: Node, pid: str) -> bool:
    record = await node.journal.get(pid)
    return record is not None and record.status == "succeeded" and bool(record.images)


async def orphaned(node: Node, pid: str) -> tuple[float | None, float | None]:
    rows = await node.journal._fetch("SELECT orphaned_at, adopted_at FROM flux_predictions WHERE id = %s", (pid,))
    return rows[0][0], rows[0][1]


async def test_two_reissues_of_two_cut_calls_adopt_the_two_orphans_one_each_without_paying(
        make_node, fake: AtlasFake):
    gate = Gate(POLL)
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        jobs = await cut_calls(a, b, gate, fake, tg, 2)
        assert fake.count(SUBMIT) == 2 and [(await orphaned(b, pid))[0] is not None for pid in jobs] == [True, True]
        again: list[Outcome] = []

        async def reissue() -> None:
            again.append(await b.run(PROMPT, "alice", wait_seconds=20))

        async with anyio.create_task_group() as re:
            re.start_soon(reissue)
            re.start_soon(reissue)
        assert fake.count(SUBMIT) == 2  # neither re-issue paid
        adopted = [(await orphaned(b, pid))[1] is not None for pid in jobs]
        third = await b.run(PROMPT, "alice", wait_seconds=0)  # both orphans are taken: a new job
        gate.open.set()
    assert sorted(o.record.id for o in again) == sorted(jobs)  # two different orphans, one each
    assert all(o.joined and o.record.status == "succeeded" and o.record.images for o in again)
    assert adopted == [True, True]
    assert not third.joined and third.record.id not in jobs and fake.count(SUBMIT) == 3


async def test_another_principals_identical_call_does_not_adopt_the_orphan(make_node, fake: AtlasFake):
    gate = Gate(POLL)
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        [job] = await cut_calls(a, b, gate, fake, tg, 1)
        bobs = await b.run(PROMPT, "bob", wait_seconds=0)
        alices = await b.run(PROMPT, "alice", wait_seconds=20)
        gate.open.set()
    assert not bobs.joined and bobs.record.id != job and bobs.record.principal == "bob"
    assert alices.joined and alices.record.id == job and alices.record.status == "succeeded"
    assert fake.count(SUBMIT) == 2


async def test_a_reissue_past_the_rejoin_window_does_not_adopt(make_node, fake: AtlasFake):
    gate = Gate(POLL)
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        [job] = await cut_calls(a, b, gate, fake, tg, 1)
        # b finishes the job it took over first (its images kept): its writes carry the row's creation time as
        # it read it
        await until(lambda: _kept(b, job))
        window = b.service.settings.rejoin_seconds
        async with b.journal.pool.connection() as conn:  # the cut call was made longer ago than the window
            await conn.execute("UPDATE flux_predictions SET created_at = created_at - %s WHERE id = %s",
                               (window + 5, job))
        late = await b.run(PROMPT, "alice", wait_seconds=0)
        free = (await orphaned(b, job))[1] is None
        gate.open.set()
    assert not late.joined and late.record.id != job and fake.count(SUBMIT) == 2 and free


async def test_an_identical_call_a_live_caller_on_this_replica_waits_on_is_not_adopted(make_node, fake: AtlasFake):
    async with make_node() as a, anyio.create_task_group() as tg:
        first: list[Outcome] = []

        async def call() -> None:
            first.append(await a.run(PROMPT, "alice", wait_seconds=20))

        tg.start_soon(call)
        await until(lambda: fake.jobs)
        second = await a.run(PROMPT, "alice", wait_seconds=0)  # the first call's caller is still there
        for job in list(fake.jobs):
            fake.finish(job)
    assert not second.joined and second.record.id != first[0].record.id and fake.count(SUBMIT) == 2
    key = request_key(JobRequest(prompt=PROMPT))
    assert all(o.record.request_key == key for o in (first[0], second))


async def test_an_identical_call_while_the_first_calls_submit_is_out_is_its_own_job(make_node, fake: AtlasFake):
    """The first call's job is still only an intent (its submit not answered yet): a second identical call on
    the same replica is not a re-issue of a cut call (the first's caller is here), so it does not join it."""
    gate = Gate(SUBMIT)  # holds every submit until opened
    async with make_node(gate=gate) as a, anyio.create_task_group() as tg:
        outcomes: list[Outcome] = []

        async def call() -> None:
            outcomes.append(await a.run(PROMPT, "alice", wait_seconds=20))

        tg.start_soon(call)
        await until(lambda: gate.count == 1)  # the first intent is written, its submit out
        tg.start_soon(call)
        await until(lambda: gate.count == 2)  # the second call sent a submit of its own: it did not join
        gate.open.set()
        await until(lambda: len(fake.jobs) == 2)
        for job in list(fake.jobs):
            fake.finish(job)
    assert len(outcomes) == 2 and not any(o.joined for o in outcomes)
    assert len({o.record.id for o in outcomes}) == 2 and fake.count(SUBMIT) == 2
