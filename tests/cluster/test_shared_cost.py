"""What a call costs on the shared backends, as a user would see it: a finished check reads its image once, a
delivered answer is recorded once, a reservation and its job's intent land (or not) together, and images
that came with the answer are stored while the job's id is journaled, never recorded as kept before they are
in the bucket."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest

from flux_mcp.config import Settings
from flux_mcp.journal_pg import PgJournal
from tests.cluster_env import kept_bytes
from tests.conftest import ATLAS_KEY, connect, pg_env, text_of

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


@pytest.fixture
def shared_settings(make_settings: Callable[..., Settings], shared_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        # Held submits: the image comes inline with the provider's answer (one request per job).
        return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             ATLASCLOUD_SYNC_MODE="auto", **{**shared_env, **env})
    return make


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@pytest.fixture
def s3_requests(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The object store requests the server sends, by kind (counted around obstore's own calls)."""
    import obstore

    seen: Counter[str] = Counter()
    for kind in ("get", "head", "put"):
        real = getattr(obstore, f"{kind}_async")

        async def counted(*args: Any, _real: Any = real, _kind: str = kind, **kw: Any) -> Any:
            seen[_kind] += 1
            return await _real(*args, **kw)

        monkeypatch.setattr(obstore, f"{kind}_async", counted)
    return seen


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql)
        return list(await cur.fetchall())


async def test_a_finished_check_reads_its_image_once_for_both_the_check_and_the_preview(
        shared_settings, fake, s3_requests):
    async with connect(shared_settings(), fake) as client:
        made = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        pid = made.structured_content["prediction_id"]
        s3_requests.clear()
        again = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert s3_requests == Counter({"get": 1}), "a finished check sent more than one request to the bucket"
    assert any(c.type == "image" for c in again.content), "the preview is missing"
    assert "X-Amz-Signature" in again.structured_content["images"][0]["url"]


async def test_a_check_finds_an_image_gone_from_the_bucket_and_stores_it_again(shared_settings, fake, shared_env):
    import obstore
    from obstore.store import S3Store

    from tests.cluster_env import S3_KEY_ID, S3_REGION, S3_SECRET

    async with connect(shared_settings(), fake) as client:
        made = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        location = made.structured_content["images"][0]["path"]
        bucket, _, key = location.removeprefix("s3://").partition("/")
        store = S3Store(bucket, endpoint=shared_env["AWS_ENDPOINT_URL"], access_key_id=S3_KEY_ID,
                        secret_access_key=S3_SECRET, region=S3_REGION, client_options={"allow_http": True})
        await obstore.delete_async(store, key)
        assert kept_bytes(location) is None
        again = await client.call_tool("check_prediction", {"prediction_id": made.structured_content["prediction_id"]})
    assert again.structured_content["status"] == "succeeded", text_of(again)
    assert kept_bytes(again.structured_content["images"][0]["path"]) is not None
    assert len(fake.ledger) == 1


async def test_an_answer_already_delivered_is_not_recorded_again(shared_settings, fake, shared_env, monkeypatch):
    marked: list[str] = []
    real = PgJournal.mark_delivered

    async def counted(self: PgJournal, prediction_id: str) -> None:
        marked.append(prediction_id)
        await real(self, prediction_id)

    monkeypatch.setattr(PgJournal, "mark_delivered", counted)
    async with connect(shared_settings(), fake) as client:
        made = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        pid = made.structured_content["prediction_id"]
        for _ in range(2):
            again = await client.call_tool("check_prediction", {"prediction_id": pid})
            assert again.structured_content["status"] == "succeeded"
        # Delivered: an identical call is a new job, not a join of this one.
        other = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
    assert marked == [pid, other.structured_content["prediction_id"]]
    rows = await _rows(shared_env["FLUX_MCP_DATABASE_URL"], "SELECT id FROM flux_predictions WHERE delivered")
    assert sorted(r[0] for r in rows) == sorted(marked)
    assert other.structured_content["prediction_id"] != pid and len(fake.ledger) == 2


async def test_a_reservation_lands_with_its_intent_and_is_billed_with_its_id(shared_settings, fake, shared_env):
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    # $0.003 a job: two jobs fit the day's budget.
    async with connect(shared_settings(FLUX_MCP_BUDGET_DAY_USD="0.006"), fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "a fox", "idempotency_key": "fox-1"})
        same = await client.call_tool("generate_image", {"prompt": "a fox", "idempotency_key": "fox-1"})
        second = await client.call_tool("generate_image", {"prompt": "an owl"})
        refused = await client.call_tool("generate_image", {"prompt": "a heron"})
    made = {first.structured_content["prediction_id"], second.structured_content["prediction_id"]}
    assert same.structured_content["prediction_id"] == first.structured_content["prediction_id"]
    assert refused.is_error and "Nothing was submitted" in text_of(refused)
    assert len(fake.ledger) == 2
    charges = await _rows(url, "SELECT state, prediction_id FROM flux_charges")
    assert sorted(charges) == sorted(("billed", pid) for pid in made)
    assert await _rows(url, "SELECT id FROM flux_predictions WHERE native_id = ''") == []  # no intent left


async def test_an_image_is_recorded_as_kept_only_once_it_is_in_the_bucket(
        shared_settings, fake, shared_env, monkeypatch):
    import obstore

    url = shared_env["FLUX_MCP_DATABASE_URL"]
    putting, release = anyio.Event(), anyio.Event()
    real = obstore.put_async

    async def held_put(*args: Any, **kw: Any) -> Any:
        putting.set()
        await release.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(obstore, "put_async", held_put)
    results: list[Any] = []
    async with connect(shared_settings(), fake) as client, anyio.create_task_group() as tg:
        async def call() -> None:
            results.append(await client.call_tool("generate_image", {"prompt": "a lighthouse"}))

        tg.start_soon(call)
        with anyio.fail_after(20):
            await putting.wait()
            # The job's id is journaled while its image is being stored; the row names no kept image yet.
            while not (rows := await _rows(url, "SELECT id, images FROM flux_predictions WHERE native_id <> ''")):
                await anyio.sleep(0.01)
        [(pid, images)] = rows
        assert images in ([], None, "[]"), f"recorded as kept before it was stored: {images}"
        release.set()
    [result] = results
    assert result.structured_content["prediction_id"] == pid
    location = result.structured_content["images"][0]["path"]
    assert kept_bytes(location) is not None
    [(images,)] = await _rows(url, f"SELECT images FROM flux_predictions WHERE id = '{pid}'")
    assert location in str(images)


_PERIODIC = ("SET lease_until = ", "WITH due AS", "WHERE status = 'submitting' AND lease_until <", "LISTEN")
"""Statements no call sends (each replica's heartbeat, reconciler passes, LISTEN, readiness checks)."""


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the server sends to PostgreSQL (its pool's connections: not this test's reads), in order,
    the periodic ones left out."""
    sent: list[str] = []
    real = psycopg.AsyncConnection.execute

    async def execute(self: Any, query: Any, *args: Any, **kw: Any) -> Any:
        text = " ".join(str(query).split())
        ours = self.info.parameter_status("application_name") == "flux-mcp"
        if ours and text != "SELECT 1" and not any(p in text for p in _PERIODIC):
            sent.append(text)
        return await real(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", execute)
    return sent


async def _delivered(url: str, pid: str) -> None:
    with anyio.fail_after(10):
        while not await _rows(url, f"SELECT 1 FROM flux_predictions WHERE id = '{pid}' AND delivered"):
            await anyio.sleep(0.01)


@pytest.mark.parametrize(("sync", "keyed", "lookup"), [("off", True, 0), ("auto", False, 1)],
                         ids=["polled-keyed", "held-keyless"])
async def test_a_job_costs_three_statements_until_its_answer_plus_the_call_lookup_and_its_delivered_mark_after(
        make_settings, fake, shared_env, statements, sync, keyed, lookup):
    """Intent (with the reservation), the provider's id (with the charge billed; an inline image is stored
    meanwhile), the final state with the kept images (with the charge settled and the notification); a key-less
    call looks for an earlier identical one first (a keyed call's intent finds its key's job). The delivered mark
    comes after the answer, batched."""
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             ATLASCLOUD_SYNC_MODE=sync, **shared_env)
    async with connect(settings, fake) as client:
        warm = await client.call_tool("generate_image", {"prompt": "warm-up"})  # the model's durations are read once
        await _delivered(url, warm.structured_content["prediction_id"])
        statements.clear()
        args = {"prompt": "a lighthouse", **({"idempotency_key": "lh-1"} if keyed else {})}
        made = await client.call_tool("generate_image", args)
        answered = list(statements)
        pid = made.structured_content["prediction_id"]
        await _delivered(url, pid)
        after = statements[len(answered):]
        if keyed:
            again = await client.call_tool("generate_image", args)
    assert made.structured_content["status"] == "succeeded", text_of(made)
    assert len(answered) == 3 + lookup, [a[:50] for a in answered]
    assert len(after) == 1 and "delivered = TRUE" in after[0], after
    [(state, usd, estimated)] = await _rows(url, f"SELECT state, usd, estimated FROM flux_charges "
                                                 f"WHERE prediction_id = '{pid}'")
    assert (state, usd, estimated) == ("billed", fake.price, False)
    if keyed:  # the key's job, found by the intent alone: nothing paid again
        assert again.structured_content["prediction_id"] == pid and len(fake.ledger) == 2
