"""The provider HTTP layer: capped status answers, the one retry loop, wait hints, declarative error rules."""

from __future__ import annotations

import email.utils
import gzip
import re

import anyio
import httpx2
import pytest
from pydantic import SecretStr

from flux_mcp.config import ProviderSettings
from flux_mcp.errors import (
    AuthFailed,
    InsufficientCredits,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
)
from flux_mcp.http import (
    AnswerTooLarge,
    ErrorRule,
    GaveUp,
    ProviderHttp,
    Retryable,
    RetryPolicy,
    wait_hint,
    with_retries,
)
from flux_mcp.providers import AtlasCloud, ImageRequest
from flux_mcp.redact import Redactor
from tests.conftest import ATLAS_KEY, FAST_RETRY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


def bomb_pieces(decoded: int = 64 * 1024 * 1024, piece: int = 1024) -> list[bytes]:
    """A gzip body that inflates to `decoded` bytes of JSON-ish whitespace, cut into `piece`-byte chunks."""
    compressed = gzip.compress(b"{" + b" " * decoded + b"}", 9)
    return [compressed[i:i + piece] for i in range(0, len(compressed), piece)]


class Bomb:
    """Answers every request with a fresh gzip bomb; counts the requests and the compressed pieces read."""

    def __init__(self) -> None:
        self.pieces = bomb_pieces()
        self.requests = 0
        self.pulled = 0

    def response(self) -> httpx2.Response:
        async def stream():
            for piece in self.pieces:
                self.pulled += 1
                yield piece

        self.requests += 1
        return httpx2.Response(200, content=stream(), headers={"content-encoding": "gzip",
                                                              "content-type": "application/json"})


# --- status answers are capped, and a capped one is not asked for again ---------------------------


async def test_a_gzip_bomb_status_answer_is_refused_after_one_request_and_a_little_reading():
    bomb = Bomb()
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(lambda request: bomb.response()))
    http = ProviderHttp(client, "atlascloud", Redactor(), retry=RetryPolicy(attempts=4, base_delay=0))
    async with client:
        with pytest.raises(AnswerTooLarge, match="over 1048576 bytes") as caught:
            await http.fetch("GET", "http://atlas.test/api/v1/model/prediction/p1")
    assert "not asked for again" in str(caught.value)
    assert bomb.requests == 1
    assert bomb.pulled < len(bomb.pieces) // 8  # stopped at the cap, not inflated to the end


async def test_the_status_cap_is_configurable(fake):
    big = {"code": 200, "data": {"id": "p1", "status": "processing", "padding": "x" * 5000}}
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, json=big))
    client = httpx2.AsyncClient(transport=transport)
    small = ProviderHttp(client, "atlascloud", Redactor(), retry=RetryPolicy(max_status_bytes=4096))
    roomy = ProviderHttp(client, "atlascloud", Redactor(), retry=RetryPolicy(max_status_bytes=8192))
    async with client:
        with pytest.raises(AnswerTooLarge):
            await small.fetch("GET", "http://atlas.test/x")
        assert (await roomy.fetch("GET", "http://atlas.test/x")).status_code == 200


class BombingPolls:
    """The Atlas fake, whose status answers become gzip bombs once `on` is set."""

    def __init__(self, fake: AtlasFake):
        self.fake, self.bomb, self.on, self.polls = fake, Bomb(), False, 0

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.startswith("/api/v1/model/prediction/"):
            self.polls += 1
            if self.on:
                return self.bomb.response()
        return await self.fake.handle(request)


async def test_a_bombed_status_check_keeps_the_job_and_costs_one_request(polled_settings, fake):
    fake.hold = True
    wire = BombingPolls(fake)
    async with connect(polled_settings, wire) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        wire.on, before = True, wire.polls
        with anyio.fail_after(10):
            checked = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 0})
    assert checked.structured_content["status"] in ("starting", "processing")
    assert "not asked for again" in text_of(checked) and pid in text_of(checked)
    assert wire.polls - before == 1 and len(fake.ledger) == 1


# --- Atlas Cloud: a status answer that carries base64 images may be large ---------------------------


def _native(pid: str) -> str:
    return pid.split(":", 1)[1]


async def test_a_sync_job_polled_later_gets_its_base64_images_from_a_large_status_answer(settings, fake):
    fake.hold, fake.noisy_images, fake.image_size = True, True, (700, 700)  # ~1.5 MB PNG, 2 MB as base64
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        assert pending.structured_content["status"] in ("starting", "processing")
        fake.finish(_native(pid))
        done = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert done.structured_content["images"][0]["path"]


async def test_after_a_restart_a_large_base64_status_answer_is_read_on_the_next_check(settings, fake):
    fake.hold, fake.noisy_images, fake.image_size = True, True, (700, 700)
    async with connect(settings, fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
    pid = pending.structured_content["prediction_id"]
    fake.finish(_native(pid))
    async with connect(settings, fake) as restarted:
        with anyio.fail_after(20):
            done = await restarted.call_tool("check_prediction", {"prediction_id": pid})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert len(fake.ledger) == 1


async def test_the_atlas_adapter_allows_a_larger_status_answer_once_one_was_over_the_cap(fake):
    """A job asked with base64 output before this process started: the first over-cap answer says why, the
    next status check reads up to a submit's cap."""
    fake.hold, fake.noisy_images, fake.image_size = True, True, (700, 700)
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
    http = ProviderHttp(client, "atlascloud", Redactor([ATLAS_KEY]), key_env="ATLASCLOUD_API_KEY",
                        retry=FAST_RETRY)
    atlas = AtlasCloud(ProviderSettings(api_key=SecretStr(ATLAS_KEY), base_url="http://atlas.test"), http)
    async with client:
        submitted = await atlas.submit(ImageRequest(kind="generate", prompt="p", model=atlas.default_model),
                                       inline=True)
        fake.finish(submitted.native_id)
        fresh = AtlasCloud(atlas.settings, http)  # as after a restart: it never saw the submit
        with pytest.raises(AnswerTooLarge, match="may hold the images themselves"):
            await fresh.poll(submitted.native_id, submitted.submitted_at)
        state = await fresh.poll(submitted.native_id, submitted.submitted_at)
    assert state.status == "succeeded" and state.outputs[0].data is not None
    assert len(fake.ledger) == 1


# --- the one retry loop --------------------------------------------------------------------------


async def test_retryable_failures_are_retried_with_the_servers_hint_then_succeed():
    seen: list[bool] = []

    async def attempt(final: bool) -> str:
        seen.append(final)
        if len(seen) < 3:
            raise Retryable("busy", after=0)
        return "done"

    with anyio.fail_after(5):
        assert await with_retries(attempt, RetryPolicy(attempts=3, max_retry_after=30)) == "done"
    assert seen == [False, False, True]


async def test_the_loop_gives_up_naming_the_last_failure():
    async def attempt(final: bool) -> str:
        raise httpx2.ReadError("connection reset")

    with pytest.raises(GaveUp) as caught:
        await with_retries(attempt, RetryPolicy(attempts=2, base_delay=0))
    gave_up = caught.value
    assert (gave_up.attempts, gave_up.reason, gave_up.kind) == (2, "connection reset", "ReadError")


async def test_each_attempt_has_a_deadline():
    async def attempt(final: bool) -> str:
        await anyio.sleep(5)
        return "late"

    with anyio.fail_after(5), pytest.raises(GaveUp, match=r"no complete answer within 0.05 s"):
        await with_retries(attempt, RetryPolicy(attempts=2, base_delay=0, deadline=0.05))


async def test_other_errors_are_not_retried():
    calls = 0

    async def attempt(final: bool) -> str:
        nonlocal calls
        calls += 1
        raise ValueError("permanent")

    with pytest.raises(ValueError):
        await with_retries(attempt, RetryPolicy(attempts=4, base_delay=0))
    assert calls == 1


async def test_a_retry_status_on_the_last_try_is_returned_for_the_adapter_to_map():
    statuses = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        statuses.append(503)
        return httpx2.Response(503, json={"message": "busy"}, headers={"retry-after": "0"})

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    http = ProviderHttp(client, "atlascloud", Redactor(), retry=FAST_RETRY)
    async with client:
        response = await http.fetch("GET", "http://atlas.test/x")
    assert response.status_code == 503 and len(statuses) == FAST_RETRY.attempts


# --- the one reading of a wait hint -----------------------------------------------------------------


def answer(headers: dict[str, str] | None = None, body: str = "") -> httpx2.Response:
    return httpx2.Response(429, text=body, headers=headers or {})


@pytest.mark.parametrize(("headers", "body", "seconds", "until"), [
    ({"retry-after": "7"}, "", 7.0, None),
    ({"retry-after": "0"}, "", 0.0, None),
    ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, "", 30.0, None),
    ({"x-rate-limit-reset-at-utc": "2027-01-15T08:00:30Z"}, "", None, "2027-01-15T08:00:30Z"),
    ({"x-rate-limit-reset-at-utc": f"{NOW + 12:.3f}"}, "", 12.0, f"{NOW + 12:.3f}"),
    ({"x-rate-limit-reset-at-utc": f"{(NOW + 12) * 1000:.0f}"}, "", 12.0, f"{(NOW + 12) * 1000:.0f}"),
    ({"ratelimit-reset": "9"}, "", 9.0, None),
    ({"x-ratelimit-reset": f"{NOW + 20:.0f}"}, "", 20.0, f"{NOW + 20:.0f}"),
    ({}, '{"statusCode": 429, "message": "Rate limit is exceeded. Try again in 45 seconds."}', 45.0, None),
    ({"retry-after": "soon"}, "", None, None),
    ({}, '{"error": "Too many requests"}', None, None),
])
def test_wait_hints_in_every_documented_form(headers, body, seconds, until):
    hint = wait_hint(answer(headers, body), now=NOW)
    if seconds is None and until is None:
        assert hint is None
        return
    assert hint is not None and hint.until == until
    if seconds is not None:
        assert hint.seconds == pytest.approx(seconds)


def test_a_reset_moment_is_said_as_about_so_many_seconds():
    hint = wait_hint(answer({"x-rate-limit-reset-at-utc": f"{NOW + 29.2:.1f}"}), now=NOW)
    assert hint is not None and hint.when() == "in about 30 seconds"
    exact = wait_hint(answer({"retry-after": "7"}), now=NOW)
    assert exact is not None and exact.when() == "in 7 seconds"


# --- declarative error rules, fed to the one error_for ------------------------------------------------


def provider_http() -> ProviderHttp:
    return ProviderHttp(httpx2.AsyncClient(), "acme", Redactor([ATLAS_KEY]), key_env="ACME_API_KEY")


RULES = (
    ErrorRule(InsufficientCredits, "Acme: out of credit (HTTP {status}: {code_detail}).", code="NO_CREDIT"),
    ErrorRule(ProviderRejected, "Acme: {what} is retired (HTTP 410).", status=410),
    ErrorRule(AuthFailed, "Acme: quota used up ({detail}).", status=403, pattern="quota"),
    ErrorRule(ProviderRejected, "Acme: the job is gone (HTTP 404).", status=404, phase="poll"),
)


@pytest.mark.parametrize(("status", "body", "phase", "cls", "text"), [
    (400, {"error_code": "NO_CREDIT", "message": "top up"}, "submit", InsufficientCredits,
     "Acme: out of credit (HTTP 400: NO_CREDIT: top up)."),
    (410, {"error": "gone"}, "submit", ProviderRejected, "Acme: model m1 is retired (HTTP 410)."),
    (403, {"message": "Out of call volume QUOTA"}, "submit", AuthFailed, "Acme: quota used up"),
    (403, {"message": "not your model"}, "submit", AuthFailed,
     "acme denied access (HTTP 403: not your model)"),
    (404, {"message": "no such job"}, "poll", ProviderRejected, "Acme: the job is gone"),
    (404, {"message": "no such endpoint"}, "submit", ProviderRejected,
     "acme rejected the request (HTTP 404: no such endpoint).Check it."),
    (401, {"message": f"bad key {ATLAS_KEY}"}, "poll", AuthFailed, "refused the API key in ACME_API_KEY"),
    (429, {"message": "slow"}, "submit", RateLimited, "the job was not created. Try again in 3 seconds."),
    (429, {"message": "slow"}, "poll", RateLimited,
     "the job keeps running. Call check_prediction in 3 seconds."),
    (502, "<html>bad gateway</html>", "submit", SubmitOutcomeUnknown, "may or may not have started the job"),
    (502, "<html>bad gateway</html>", "poll", ProviderUnavailable, "had a server error (HTTP 502: an HTML"),
    (302, "", "poll", ProviderUnavailable, "answered with a redirect (HTTP 302)"),
])
def test_the_first_matching_rule_wins_then_the_shared_ones(status, body, phase, cls, text):
    headers = {"retry-after": "3"} if status == 429 else {}
    response = (httpx2.Response(status, json=body, headers=headers) if not isinstance(body, str)
                else httpx2.Response(status, text=body, headers={"content-type": "text/html"}))
    error = provider_http().error_for(response, RULES, phase=phase, what="model m1", advice="Check it.")
    assert type(error) is cls and text in str(error), str(error)
    assert ATLAS_KEY not in str(error) and ATLAS_KEY[5:17] not in str(error)
    if cls is RateLimited:
        assert isinstance(error, RateLimited) and error.retry_after == 3.0
    if cls is InsufficientCredits:
        assert isinstance(error, InsufficientCredits)
        assert (error.status_code, error.code) == (400, "NO_CREDIT")


def test_every_adapter_declares_rules_whose_templates_fill():
    """Each adapter's rules use only fields it passes (a missing one would raise at the worst time)."""
    from flux_mcp.providers import acedatacloud, appypie, atlascloud, imagepipeline, segmind

    extra = {"segmind": {"what": "model m", "instead": "", "choices": "a, b", "where": "SEGMIND_BASE_URL"},
             "imagepipeline": {"job": "j1"}}
    for module in (atlascloud, segmind, acedatacloud, imagepipeline, appypie):
        name = module.__name__.rsplit(".", 1)[1]
        rules = [r for r in vars(module).values()
                 if isinstance(r, tuple) and r and isinstance(r[0], ErrorRule)]
        assert rules, f"{name} declares no error rules"
        for rule in (rule for group in rules for rule in group):
            fields = set(re.findall(r"{(\w+)}", rule.text))
            known = {"who", "status", "detail", "code", "code_detail", "var", "var_in", "when", "reset",
                     "then", "advice", *extra.get(name, {})}
            assert fields <= known, (name, rule.text, fields - known)


async def test_a_status_answer_that_fails_to_decompress_is_retried_like_a_network_error():
    async def corrupt():
        yield b"not gzip at all"

    answers = [httpx2.Response(200, content=corrupt(), headers={"content-encoding": "gzip"}),
               httpx2.Response(200, json={"code": 200, "data": {"id": "p1", "status": "processing"}})]
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(lambda request: answers.pop(0)))
    http = ProviderHttp(client, "atlascloud", Redactor(), retry=FAST_RETRY)
    async with client:
        response = await http.fetch("GET", "http://atlas.test/x")
    assert response.status_code == 200 and answers == []
