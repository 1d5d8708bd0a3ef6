"""The journal and the image store behind their protocols, on both backends: SQLite + data folder, and
PostgreSQL + an S3 bucket (real servers started by the test setup). Each test states what a server built
on either backend must do; the shared-mode-only parts (presigned links, several replicas) follow."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from flux_mcp.backends import open_journal, open_store
from flux_mcp.config import Settings
from flux_mcp.journal import ATTEMPT_RETENTION, Attempt, Charge, Journal, Record, Totals
from flux_mcp.models import ImageOutput
from flux_mcp.store import ImageStore
from tests.conftest import pg_env
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "pg"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Settings]:
    """Settings for one backend; several calls give several servers over the same state."""
    env = {"FLUX_MCP_HOME": str(tmp_path / "home")}
    if request.param == "pg":
        env.update(pg_env(request))

    def make() -> Settings:
        return Settings.from_env(env, cwd=tmp_path)

    return make


@pytest.fixture
async def journal(backend: Callable[[], Settings]) -> AsyncIterator[Journal]:
    j = await open_journal(backend())
    try:
        yield j
    finally:
        await j.close()


@pytest.fixture
def store(backend: Callable[[], Settings]) -> ImageStore:
    return open_store(backend())


def record(i: int = 1, **kw: Any) -> Record:
    base: dict[str, Any] = dict(id=f"atlascloud:job{i}", provider="atlascloud", native_id=f"job{i}",
                                model="black-forest-labs/flux-schnell", kind="generate", status="starting",
                                request={"prompt": f"a red fox {i}", "num_images": 1})
    base.update(kw)
    return Record(**base)


# --- the journal ----------------------------------------------------------------------------------

async def test_a_record_comes_back_as_it_was_put_and_a_later_put_replaces_it(journal: Journal):
    rec = record(principal="alice", request_key="k1", idempotency_key="idem-1", cost_usd=0.003)
    assert await journal.put(rec)
    got = await journal.get(rec.id)
    assert got == rec
    rec.status, rec.completed_at, rec.delivered = "succeeded", rec.created_at + 2.5, True
    rec.images = [ImageOutput(url="https://x.test/a.png", path="/tmp/a.png", mime_type="image/png", width=8,
                              height=8)]
    rec.outputs = ["https://x.test/a.png"]
    assert await journal.put(rec)
    assert await journal.get(rec.id) == rec
    assert await journal.get("atlascloud:nope") is None


async def test_every_server_on_the_same_state_sees_what_another_wrote(backend: Callable[[], Settings]):
    first, second = await open_journal(backend()), await open_journal(backend())
    try:
        await first.put(record(7))
        got = await second.get("atlascloud:job7")
        assert got is not None and got.request["prompt"] == "a red fox 7"
    finally:
        await first.close()
        await second.close()


async def test_the_typical_duration_is_the_median_of_recent_successes(journal: Journal):
    now = time.time()
    assert await journal.typical_duration("atlascloud", "black-forest-labs/flux-schnell") is None
    for i, seconds in enumerate([2.0, 4.0, 30.0]):
        await journal.put(record(i, status="succeeded", created_at=now - 100 + i, completed_at=now - 100 + i + seconds))
    await journal.put(record(9, status="failed", created_at=now - 50, completed_at=now))
    assert await journal.typical_duration("atlascloud", "black-forest-labs/flux-schnell") == 4.0


async def test_only_jobs_that_measured_their_duration_teach_it(journal: Journal):
    """A job found done by its first check, made when it was expected, says only that it took no longer: it is kept
    (with its completion moment) but the model's durations are learned from the others."""
    now = time.time()
    for i, (seconds, timed) in enumerate([(5.0, True), (5.2, True), (4.0, False), (4.0, False), (5.1, True)]):
        await journal.put(record(i, status="succeeded", created_at=now - 100 + i,
                                 completed_at=now - 100 + i + seconds, timed=timed))
    assert await journal.recent_durations("atlascloud", "black-forest-labs/flux-schnell") == pytest.approx(
        [5.1, 5.2, 5.0])  # newest first
    assert await journal.typical_duration("atlascloud", "black-forest-labs/flux-schnell") == pytest.approx(5.1)
    kept = await journal.get("atlascloud:job2")
    assert kept is not None and kept.timed is False and kept.completed_at == pytest.approx(now - 100 + 2 + 4.0)


async def test_upload_urls_are_reused_only_while_young(journal: Journal):
    await journal.add_upload("ab" * 32, "atlascloud", "https://files.test/u1.png")
    assert await journal.upload_url("ab" * 32, "atlascloud", 3600) == "https://files.test/u1.png"
    assert await journal.upload_url("ab" * 32, "segmind", 3600) is None
    await anyio.sleep(0.01)
    assert await journal.upload_url("ab" * 32, "atlascloud", 0.001) is None


async def test_only_finished_records_are_pruned_and_never_a_pending_one(journal: Journal):
    old = time.time() - 10 * 86400
    for i, status in enumerate(["succeeded", "failed", "processing", "canceled"]):
        rec = record(i, status=status)
        await journal.put(rec)
    finished = await journal.finished_before(time.time() + 1, 10)
    assert {r.id for r in finished} == {"atlascloud:job0", "atlascloud:job1", "atlascloud:job3"}
    assert await journal.finished_before(old, 10) == []
    removed = await journal.remove(["atlascloud:job0", "atlascloud:job2"])
    assert removed == 1
    assert await journal.get("atlascloud:job0") is None and await journal.get("atlascloud:job2") is not None


async def test_refusals_are_counted_per_provider_with_the_latest_reason(journal: Journal):
    now = time.time()
    for at, provider, kind, reason in [(now - 900, "atlascloud", "no_credit", "long ago"),
                                       (now - 30, "atlascloud", "rate_limited", "too many requests"),
                                       (now - 10, "atlascloud", "no_credit", "insufficient balance"),
                                       (now - 20, "segmind", "unreachable", "connection refused"),
                                       (now - 8, "segmind", "refused", "size is not supported"),
                                       (now - 5, "acedatacloud", "unsuitable", "does not take these arguments")]:
        assert await journal.add_attempt(Attempt("alice", provider, "flux-dev", kind, reason, at=at))
    seen = await journal.refusals_since(now - 600)
    assert set(seen) == {"atlascloud", "segmind"}  # "unsuitable", "refused": about the request, not the provider
    assert (seen["atlascloud"].count, seen["atlascloud"].last_kind, seen["atlascloud"].last_reason) == (
        2, "no_credit", "insufficient balance")
    assert seen["atlascloud"].last_at == pytest.approx(now - 10)
    assert seen["segmind"].count == 1 and seen["segmind"].last_kind == "unreachable"
    assert await journal.refusals_since(now) == {}


async def test_attempts_older_than_a_day_go_and_a_prune_removes_older_ones(journal: Journal):
    now = time.time()
    await journal.add_attempt(Attempt("local", "atlascloud", "m", "no_credit", "ancient", at=now - ATTEMPT_RETENTION - 60))
    await journal.add_attempt(Attempt("local", "atlascloud", "m", "no_credit", "an hour ago", at=now - 3600))
    assert [r.count for r in (await journal.refusals_since(0)).values()] == [2]
    await journal.add_attempt(Attempt("local", "segmind", "m", "bad_key", "now", at=now))  # each write trims
    assert {p: r.count for p, r in (await journal.refusals_since(0)).items()} == {"atlascloud": 1, "segmind": 1}
    assert await journal.remove_attempts(now - 60, dry_run=True) == 1
    assert len(await journal.refusals_since(0)) == 2  # a dry run removes nothing
    assert await journal.remove_attempts(now - 60) == 1
    assert set(await journal.refusals_since(0)) == {"segmind"}


async def test_a_delivered_job_stays_delivered_and_is_never_joined(journal: Journal):
    now = time.time()
    rec = record(1, principal="alice", request_key="k", created_at=now)
    await journal.put(rec)
    assert [r.id for r in await journal.rejoinable("alice", "k", now - 60)] == [rec.id]
    assert await journal.rejoinable("bob", "k", now - 60) == []
    await journal.mark_delivered(rec.id)
    assert await journal.rejoinable("alice", "k", now - 60) == []
    stale = record(1, principal="alice", request_key="k", created_at=now, status="succeeded")
    assert stale.delivered is False
    await journal.put(stale)  # a later write of a copy made before the answer was delivered
    got = await journal.get(rec.id)
    assert got is not None and got.delivered and got.status == "succeeded"


async def test_an_unanswered_job_is_found_behind_many_newer_delivered_ones(journal: Journal):
    """Delivered marks may be written a moment later (SQLite coalesces them): jobs just delivered never hide an
    older one whose answer was lost from an identical call."""
    now = time.time()
    lost = record(1, principal="alice", request_key="k", created_at=now - 5)
    await journal.put(lost)
    for i in range(8):
        done = record(10 + i, principal="alice", request_key="k", created_at=now - 4 + i * 0.1)
        await journal.put(done)
        await journal.mark_delivered(done.id)
    assert [r.id for r in await journal.rejoinable("alice", "k", now - 60)] == [lost.id]


async def test_an_idempotency_key_finds_its_job_and_a_second_job_cannot_take_it(journal: Journal):
    first = record(1, principal="alice", idempotency_key="idem")
    assert await journal.put(first)
    found = await journal.by_idempotency_key("alice", "idem")
    assert found is not None and found.id == first.id
    assert await journal.by_idempotency_key("bob", "idem") is None
    assert await journal.put(record(2, principal="bob", idempotency_key="idem"))  # another caller's key
    clash = record(3, principal="alice", idempotency_key="idem")
    assert not await journal.put(clash)  # kept, not lost, and not written over the first job
    assert clash.id in journal.unwritten()
    assert await journal.get(clash.id) is not None
    kept = await journal.get(first.id)
    assert kept is not None and kept.idempotency_key == "idem"


async def test_history_search_filters_and_pages_newest_first(journal: Journal):
    now = time.time()
    prompts = ["A Red Fox", "a blue whale", "red sunset", "RED fox again"]
    for i, prompt in enumerate(prompts):
        await journal.put(record(i, principal="alice" if i != 2 else "bob", created_at=now + i,
                                 status="processing" if i == 3 else "succeeded",
                                 request={"prompt": prompt, "num_images": 1}))
    args: dict[str, Any] = dict(provider=None, status=None, since=None, before=None)
    found = await journal.search(principal="alice", query="red FOX", limit=10, **args)
    assert [r.id for r in found] == ["atlascloud:job3", "atlascloud:job0"]
    everyone = await journal.search(principal=None, query="red", limit=2, **args)
    assert [r.id for r in everyone] == ["atlascloud:job3", "atlascloud:job2"]
    last = everyone[-1]
    rest = await journal.search(principal=None, query="red", limit=2, provider=None, status=None, since=None,
                                before=(last.created_at, last.id))
    assert [r.id for r in rest] == ["atlascloud:job0"]
    pending = await journal.search(principal="alice", query=None, limit=10, provider="atlascloud",
                                   status="pending", since=now + 1, before=None)
    assert [r.id for r in pending] == ["atlascloud:job3"]


def charge(i: int, usd: float | None = 0.5, **kw: Any) -> Charge:
    return Charge(id=f"c{i}", principal=kw.pop("principal", "alice"), provider="atlascloud",
                  model="black-forest-labs/flux-schnell", images=1, usd=usd, **kw)


async def test_the_ledger_reserves_within_a_budget_and_settles_or_releases(journal: Journal):
    start = time.time() - 1
    budget = 1.0

    def within(totals: Any) -> str | None:
        return "over budget" if totals["day"].usd + 0.5 > budget else None

    assert await journal.reserve(charge(1), {"day": start}, within) is None
    assert await journal.reserve(charge(2), {"day": start}, within) is None
    assert await journal.reserve(charge(3), {"day": start}, within) == "over budget"
    assert await journal.totals("alice", {"day": start, "later": time.time() + 60}) == {
        "day": Totals(1.0, 2), "later": Totals(0.0, 0)}
    assert await journal.totals("bob", {"day": start}) == {"day": Totals(0.0, 0)}
    await journal.update_charge("c1", "billed", "atlascloud:job1")
    await journal.settle_charge("atlascloud:job1", 0.25, estimated=False)
    await journal.release_charge("c2")  # never created
    charges = await journal.charges_since(start)
    assert [(c.id, c.state, c.usd, c.estimated, c.prediction_id) for c in charges] == [
        ("c1", "billed", 0.25, False, "atlascloud:job1")]
    await journal.settle_charge("atlascloud:job1", None, estimated=True)  # no figure: the cost stays
    assert [(c.usd, c.estimated) for c in await journal.charges_since(start)] == [(0.25, False)]


async def test_without_a_limit_a_charge_is_recorded_and_billed_with_its_cost_in_one_write(journal: Journal):
    start = time.time() - 1
    assert await journal.reserve(charge(1, 0.5), {"day": start}, None) is None
    assert await journal.reserve(charge(2, 0.5), {"day": start}, None) is None  # nothing to refuse it
    await journal.update_charge("c1", "billed", "atlascloud:job1", usd=0.003)  # ended in its submit's answer
    await journal.update_charge("c2", "billed", "atlascloud:job2")  # still running: the estimate stays
    charges = await journal.charges_since(start)
    assert [(c.id, c.state, c.usd, c.estimated, c.prediction_id) for c in charges] == [
        ("c1", "billed", 0.003, False, "atlascloud:job1"), ("c2", "billed", 0.5, True, "atlascloud:job2")]
    assert await journal.totals("alice", {"day": start}) == {"day": Totals(0.503, 2)}


async def test_two_servers_never_both_spend_the_last_dollar(backend: Callable[[], Settings]):
    first, second = await open_journal(backend()), await open_journal(backend())
    start = time.time() - 1
    refused: list[str] = []

    def within(totals: Any) -> str | None:
        return "over budget" if totals["day"].usd + 0.6 > 1.0 else None

    async def spend(journal: Journal, i: int) -> None:
        refusal = await journal.reserve(charge(i, 0.6), {"day": start}, within)
        if refusal:
            refused.append(refusal)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(spend, first if i % 2 else second, i)
        assert len(refused) == 5
        assert await first.totals("alice", {"day": start}) == {"day": Totals(0.6, 1)}
    finally:
        await first.close()
        await second.close()


# --- the image store --------------------------------------------------------------------------------

async def test_of_two_create_only_writes_of_one_object_one_wins(backend: Callable[[], Settings]):
    """What makes an upload link single-use on any replica: two stores over the same place, one name."""
    first, second = open_store(backend()), open_store(backend())
    won: list[bool] = []

    async def write(store: Any, payload: bytes) -> None:
        won.append(await store.put_object("uploads/abc123/image", payload, create=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, first, b"one")
        tg.start_soon(write, second, b"two")
    assert sorted(won) == [False, True]
    assert await second.get_object("uploads/abc123/image") in (b"one", b"two")
    assert await first.get_object("uploads/abc123/ticket.json") is None
    assert await first.put_object("uploads/abc123/used", b"1") and await first.put_object("uploads/abc123/used", b"2")
    assert await second.get_object("uploads/abc123/used") == b"2"  # without create: replaced
    with pytest.raises(ValueError):
        await first.get_object("../images/x")


async def test_a_kept_image_is_found_read_and_discarded_by_its_location(store: ImageStore):
    data = png_bytes(16, 16)
    assert await store.find("atlascloud:job1", 0) is None
    location = await store.put("atlascloud:job1", 0, data, "png")
    assert await store.find("atlascloud:job1", 0) == location
    assert await store.read(location) == data
    assert await store.present(location)
    assert await store.discard(location)
    assert not await store.present(location)
    assert await store.find("atlascloud:job1", 0) is None
    with pytest.raises(FileNotFoundError):
        await store.read(location)


async def test_two_servers_keeping_one_image_leave_one_copy(backend: Callable[[], Settings]):
    a, b = open_store(backend()), open_store(backend())
    data = png_bytes(16, 16)
    first = await a.put("atlascloud:same", 0, data, "png")
    second = await b.put("atlascloud:same", 0, data, "png")
    assert first == second and await b.read(first) == data


async def test_the_store_reads_or_deletes_nothing_but_its_own_copies(store: ImageStore, tmp_path: Path):
    outside = tmp_path / "project-file.png"
    outside.write_bytes(png_bytes())
    assert not await store.discard(str(outside)) and outside.exists()
    assert not await store.discard("s3://someone-elses-bucket/images/atlascloud/x-0.png")


# --- shared mode: links for remote clients ------------------------------------------------------------

async def test_a_bucket_image_gets_a_presigned_link_that_downloads_it(request: pytest.FixtureRequest, tmp_path: Path):
    env = {"FLUX_MCP_HOME": str(tmp_path), "FLUX_MCP_PRESIGN_SECONDS": "120", **pg_env(request)}
    store = open_store(Settings.from_env(env, cwd=tmp_path))
    data = png_bytes(24, 24)
    location = await store.put("atlascloud:link", 0, data, "png")
    url = await store.presign(location)  # type: ignore[attr-defined]
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    async with httpx2.AsyncClient() as client:
        got = await client.get(url)
        assert got.status_code == 200 and got.content == data
        # (moto checks neither the signature nor the expiry, so a tampered or expired link is not tried here.)
    assert await store.presign("/etc/passwd") is None  # type: ignore[attr-defined]
