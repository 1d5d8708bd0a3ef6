"""A replica that dies while its submit is out: the reconciler looks for the job in Atlas Cloud's own history.

Replica `a` runs no heartbeat (its intents lapse); the fake accepts the submit and holds its answer
(`answer_gate`), so the job exists on the provider while its id was never journaled. Replica `b`'s
reconciler then finds it in the history listing (the request body matched field for field), turns the
intent into the job and finishes it; anything it cannot tell apart stays `unknown`, as before.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from flux_mcp.jobs import Outcome
from flux_mcp.journal import Record
from flux_mcp.replica import HISTORY_UNREAD, IN_HISTORY_TWICE, NOT_IN_HISTORY
from flux_mcp.request import JobRequest
from tests.cluster.test_leases import SUBMIT, Gate, Node, fake, make_node, shared_env, until  # noqa: F401
from tests.cluster_env import kept_bytes
from tests.conftest import ATLAS_KEY
from tests.fakes.atlascloud import AtlasFake

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

HISTORY = "GET /api/v1/model/history"
SCHNELL = "black-forest-labs/flux-schnell"


async def charges(node: Node) -> list[tuple[str, str | None]]:
    rows = await node.journal._fetch("SELECT state, prediction_id FROM flux_charges", ())
    return [(r[0], r[1]) for r in rows]


async def status_of(node: Node, pid: str) -> str | None:
    got = await node.journal.get(pid)
    return got.status if got else None


async def accepted_then_cut(a: Node, fake: AtlasFake, tg: anyio.abc.TaskGroup, late: list[Outcome],
                            wait: float = 30, **kw: object) -> tuple[str, str]:
    """A call on `a` whose submit the fake accepted and whose answer it holds; returns (intent id, job id)."""
    async def on_a() -> None:
        late.append(await a.run(wait_seconds=wait, **kw))  # type: ignore[arg-type]

    tg.start_soon(on_a)
    await until(lambda: fake.ledger)  # the provider made the job; its answer (the id) is held
    [intent_id] = list(a.journal._held)
    [job] = list(fake.jobs)
    return intent_id, f"atlascloud:{job}"


async def test_a_job_whose_answer_never_arrived_is_found_in_the_history_finished_and_given_to_the_reissue(
        make_node, fake: AtlasFake):
    fake.answer_gate = anyio.Event()
    async with make_node(heartbeat=False, lease=1.0) as a, make_node() as b, anyio.create_task_group() as tg:
        late: list[Outcome] = []
        intent_id, pid = await accepted_then_cut(a, fake, tg, late, idempotency_key="k-h")
        await until(lambda: b.replica is not None and b.replica.found == 1)
        found = await b.journal.get(pid)
        assert found is not None and found.status in ("starting", "processing") and found.idempotency_key == "k-h"
        fake.finish(pid.partition(":")[2])
        again = await b.run(idempotency_key="k-h", wait_seconds=20)  # the caller re-issues its call
        looked = await b.check(intent_id)  # the id it may have been given
        assert again.joined and again.record.id == pid and again.record.status == "succeeded"
        assert looked.record.id == pid and kept_bytes(again.record.images[0].path or "")
        billed = await charges(b)
        finished = await b.journal.get(pid)
        fake.answer_gate.set()  # a was only stalled: its answer arrives after all
        await until(lambda: late)
        after = await b.journal.get(pid)
    assert fake.count(SUBMIT) == 1 and len(fake.ledger) == 1  # found, never resubmitted
    assert billed == [("billed", pid)]  # the reservation became the job's charge, once
    assert after is not None and finished is not None  # the stalled owner's late answer changed nothing:
    assert (after.status, after.images, after.error) == (finished.status, finished.images, finished.error)
    assert late[0].record.id == pid and late[0].record.status == "succeeded"


async def test_a_keyless_reissue_adopts_the_job_found_in_the_history(make_node, fake: AtlasFake):
    fake.answer_gate = anyio.Event()
    async with make_node(heartbeat=False, lease=1.0) as a, make_node() as b, anyio.create_task_group() as tg:
        late: list[Outcome] = []
        _, pid = await accepted_then_cut(a, fake, tg, late, seed=11)
        await until(lambda: b.replica is not None and b.replica.found == 1)
        fake.finish(pid.partition(":")[2])
        again = await b.run(seed=11, wait_seconds=20)
        fake.answer_gate.set()
    assert again.joined and again.record.id == pid and again.record.status == "succeeded"
    assert again.record.images and fake.count(SUBMIT) == 1


async def test_a_submit_that_never_reached_the_provider_is_unknown_after_the_history_showed_nothing(
        make_node, fake: AtlasFake):
    gate = Gate(SUBMIT)  # held before the fake: the provider never saw it
    async with make_node(heartbeat=False, lease=1.0, gate=gate) as a, make_node() as b, \
            anyio.create_task_group() as tg:
        tg.start_soon(lambda: a.run(idempotency_key="k-n", wait_seconds=1))
        await until(gate.arrived.is_set)
        [intent_id] = list(a.journal._held)
        await until(lambda: _is_unknown(b, intent_id))
        looked = await b.check(intent_id)
        asked_history, paid = fake.count(HISTORY), list(fake.ledger)
        gate.open.set()  # the stalled submit goes on (and revives the job, as before)
    assert looked.record.status == "unknown" and looked.record.error == NOT_IN_HISTORY
    assert asked_history >= 1 and paid == [] and gate.count == 1


async def _is_unknown(node: Node, pid: str) -> bool:
    return await status_of(node, pid) == "unknown"


def _intent(n: int, principal: str, request: JobRequest) -> Record:
    return Record(id=f"atlascloud:intent-twin{n}", provider="atlascloud", native_id="", model=SCHNELL,
                  kind="generate", status="starting", request=request.journaled(), principal=principal,
                  request_key=f"rk-{principal}")


async def test_two_identical_intents_of_two_principals_with_one_job_in_the_history_are_both_unknown(
        make_node, fake: AtlasFake):
    asked = JobRequest(prompt="a lighthouse", seed=5, model=SCHNELL)
    async with make_node(heartbeat=False, lease=0.5) as a, make_node() as b:
        assert await a.journal.intent(_intent(1, "alice", asked)) is None
        assert await a.journal.intent(_intent(2, "bob", asked)) is None
        # One of the two submits reached the provider (which one cannot be told from the history).
        submitted = await a.service.providers["atlascloud"].submit(asked)
        await until(lambda: _is_unknown(b, "atlascloud:intent-twin1"))
        await until(lambda: _is_unknown(b, "atlascloud:intent-twin2"))
        first, second = [await b.journal.get(f"atlascloud:intent-twin{n}") for n in (1, 2)]
        job_row = await b.journal.get(f"atlascloud:{submitted.native_id}")
    assert first is not None and second is not None and first.error == second.error == IN_HISTORY_TWICE
    assert job_row is None and b.replica is not None and b.replica.found == 0  # no guess: nobody got the job
    assert fake.count(SUBMIT) == 1


async def test_a_history_that_cannot_be_read_leaves_unknown_and_the_key_in_no_log(
        make_node, fake: AtlasFake, caplog: pytest.LogCaptureFixture):
    fake.answer_gate = anyio.Event()
    fake.echo_key = True  # a careless provider repeating the key in its error
    fake.history_errors = [(500, {"code": 500, "message": "history is down"}, {})] * 10
    caplog.set_level(logging.DEBUG)
    async with make_node(heartbeat=False, lease=1.0) as a, make_node() as b, anyio.create_task_group() as tg:
        late: list[Outcome] = []
        intent_id, _ = await accepted_then_cut(a, fake, tg, late, wait=1, idempotency_key="k-e")
        await until(lambda: _is_unknown(b, intent_id))
        looked = await b.check(intent_id)
        fake.answer_gate.set()
    assert looked.record.status == "unknown" and looked.record.error == HISTORY_UNREAD
    assert fake.count(HISTORY) >= 1 and fake.count(SUBMIT) == 1
    assert "history could not be read" in caplog.text
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert not any(ATLAS_KEY[i:i + 12] in logged for i in range(len(ATLAS_KEY) - 11))


async def test_a_job_the_history_lists_late_goes_to_no_later_identical_intent(make_node, fake: AtlasFake):
    asked = JobRequest(prompt="a harbour", seed=8, model=SCHNELL)
    async with make_node(heartbeat=False, lease=0.5) as a, make_node() as b:
        assert await a.journal.intent(_intent(1, "alice", asked)) is None
        await until(lambda: _is_unknown(b, "atlascloud:intent-twin1"))  # the history showed nothing yet
        late = await a.service.providers["atlascloud"].submit(asked)  # ...and lists the job only now
        assert await a.journal.intent(_intent(2, "alice", asked)) is None  # the same call again, cut again
        await until(lambda: _is_unknown(b, "atlascloud:intent-twin2"))
        first, second = [await b.journal.get(f"atlascloud:intent-twin{n}") for n in (1, 2)]
        job_row = await b.journal.get(f"atlascloud:{late.native_id}")
    assert first is not None and first.error == NOT_IN_HISTORY
    assert second is not None and second.error == IN_HISTORY_TWICE  # the earlier intent may have made it
    assert job_row is None and b.replica is not None and b.replica.found == 0
