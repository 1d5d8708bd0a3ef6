"""Atlas Cloud's history listing as the adapter reads it: which job a submit made, or "cannot tell".

The adapter runs against the wire-level fake (every row is a job the fake accepted, its `requestBody` the
body exactly as it arrived); a few answers are injected to show the documented variants and bad answers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx2
import pytest
from pydantic import SecretStr

from flux_mcp.config import ProviderSettings
from flux_mcp.errors import AuthFailed, ProviderUnavailable
from flux_mcp.http import ProviderHttp
from flux_mcp.providers.atlascloud import HISTORY_PAGE, HISTORY_SLACK, AtlasCloud
from flux_mcp.redact import Redactor
from flux_mcp.request import JobRequest
from tests.conftest import ATLAS_BASE, ATLAS_KEY, FAST_RETRY
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio

SCHNELL = "black-forest-labs/flux-schnell"
DEV = "black-forest-labs/flux-dev"
HISTORY = "GET /api/v1/model/history"


@pytest.fixture
def fake() -> AtlasFake:
    return AtlasFake(key=ATLAS_KEY, hold=True)


@pytest.fixture
async def atlas(fake: AtlasFake) -> AsyncIterator[AtlasCloud]:
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as client:
        http = ProviderHttp(client, "atlascloud", Redactor([ATLAS_KEY]), key_env="ATLASCLOUD_API_KEY", retry=FAST_RETRY)
        yield AtlasCloud(ProviderSettings(api_key=SecretStr(ATLAS_KEY), base_url=ATLAS_BASE), http)


def ask(prompt: str = "a red fox", **kw: object) -> JobRequest:
    return JobRequest(prompt=prompt, model=kw.pop("model", SCHNELL), **kw)  # type: ignore[arg-type]


async def test_the_job_a_submit_made_is_found_by_its_exact_body_and_a_one_field_difference_is_not(
        atlas: AtlasCloud, fake: AtlasFake):
    since = time.time()
    made = await atlas.submit(ask(seed=1))
    await atlas.submit(ask(seed=2))
    await atlas.submit(ask("a red fox, at night", seed=1))
    found = await atlas.find_submitted({SCHNELL}, since, time.time())
    assert found.created_by(ask(seed=1)) == [made.native_id]
    assert found.created_by(ask(seed=3)) == []  # same prompt, another seed: not this request's job
    assert found.created_by(ask(seed=1, width=512)) == []
    assert fake.count("POST") == 3  # reading the history created nothing


async def test_a_held_submit_is_found_too_and_two_identical_jobs_are_both_listed(atlas: AtlasCloud, fake: AtlasFake):
    since = time.time()
    held = await atlas.submit(ask(seed=4), inline=True)
    again = await atlas.submit(ask(seed=4))
    found = await atlas.find_submitted({SCHNELL}, since, time.time())
    assert fake.ledger[0]["enable_sync_mode"] is True
    assert sorted(found.created_by(ask(seed=4)) or []) == sorted([held.native_id, again.native_id])


async def test_pages_are_read_newest_first_back_to_the_window_and_no_further(atlas: AtlasCloud, fake: AtlasFake):
    for i in range(2 * HISTORY_PAGE + 10):
        await atlas.submit(ask(f"old {i}"))
    for job in fake.jobs.values():
        job.created_at -= 3600  # an hour old
    since = time.time()
    wanted = await atlas.submit(ask("new"))
    fake.requests.clear()
    found = await atlas.find_submitted({SCHNELL}, since, time.time())
    assert found.created_by(ask("new")) == [wanted.native_id] and found.created_by(ask("old 3")) == []
    assert fake.count(HISTORY) == 1  # the first page already reaches past the window


async def test_a_job_deeper_in_the_history_than_the_first_page_is_found(atlas: AtlasCloud, fake: AtlasFake):
    since = time.time()
    first = await atlas.submit(ask("first"))
    for i in range(HISTORY_PAGE + 5):
        await atlas.submit(ask(f"later {i}"))
    fake.requests.clear()
    found = await atlas.find_submitted({SCHNELL}, since, time.time())
    assert found.created_by(ask("first")) == [first.native_id] and fake.count(HISTORY) == 2


async def test_a_job_outside_the_window_or_of_a_model_not_looked_up_is_not_told(atlas: AtlasCloud, fake: AtlasFake):
    old = await atlas.submit(ask(seed=9))
    fake.jobs[old.native_id].created_at -= int(3 * HISTORY_SLACK)
    dev = await atlas.submit(ask(seed=9, model=DEV))
    found = await atlas.find_submitted({SCHNELL}, time.time(), time.time())
    assert found.created_by(ask(seed=9)) == []
    assert found.created_by(ask(seed=9, model=DEV)) is None and dev.native_id


async def test_an_input_image_the_journal_does_not_hold_as_sent_cannot_be_told(atlas: AtlasCloud):
    found = await atlas.find_submitted({SCHNELL}, time.time(), time.time())
    assert found.created_by(ask(kind="edit", image="photos/cat.png")) is None  # uploaded first: URL unknown
    assert found.created_by(ask(kind="edit", image="data: URI (1234 chars)")) is None
    assert found.created_by(ask(kind="edit", image="https://example.com/cat.png")) == []


def _page(items: list[dict[str, object]], total: int | None = None) -> tuple[int, dict[str, object], dict[str, str]]:
    return 200, {"code": 200, "data": {"items": items, "pageNo": 1, "pageSize": HISTORY_PAGE,
                                       "total": len(items) if total is None else total}}, {}


async def test_a_request_body_given_as_an_object_and_times_in_milliseconds_are_read(atlas: AtlasCloud,
                                                                                     fake: AtlasFake):
    now = time.time()
    body = atlas.body(ask(seed=6))
    fake.history_errors = [_page([{"ID": "pred_obj", "createdAt": int(now * 1000), "model": SCHNELL,
                                   "requestBody": body, "status": "completed"}])]
    found = await atlas.find_submitted({SCHNELL}, now, now)
    assert found.created_by(ask(seed=6)) == ["pred_obj"]


@pytest.mark.parametrize("answer", [
    (200, "<html>maintenance</html>", {}),
    (200, {"code": 200, "data": {"items": [{"ID": "pred_x", "createdAt": "yesterday", "model": SCHNELL}]}}, {}),
    (500, {"code": 500, "message": "history unavailable"}, {}),
], ids=["not-json", "unreadable-time", "server-error"])
async def test_an_unreadable_history_is_an_error_never_an_empty_answer(atlas: AtlasCloud, fake: AtlasFake, answer):
    fake.history_errors = [answer] * 5
    with pytest.raises(ProviderUnavailable):
        await atlas.find_submitted({SCHNELL}, time.time(), time.time())


async def test_a_refused_key_is_reported_without_the_key(atlas: AtlasCloud, fake: AtlasFake):
    fake.echo_key = True
    fake.revoke()
    with pytest.raises(AuthFailed) as raised:
        await atlas.find_submitted({SCHNELL}, time.time(), time.time())
    assert ATLAS_KEY not in str(raised.value) and fake.count(HISTORY) == 1
