"""Faults, bad input and hostile answers, in memory: nothing lost, nothing leaked, nothing charged twice.

Every case asserts the exact outcome: the error text, the fake's ledger of paid jobs, which files
exist, and that the canary key appears nowhere.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from flux_mcp.http import RetryPolicy
from flux_mcp.media import DownloadLimits
from tests.conftest import ATLAS_BASE, ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
BASE = ATLAS_BASE


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_no_canary(*texts: str) -> None:
    for text in texts:
        assert ATLAS_KEY not in text and ATLAS_KEY[5:17] not in text and ATLAS_KEY[-12:] not in text


# --- money -----------------------------------------------------------------------------------------


class Broken:
    """Wraps the fake and breaks the submit in a chosen way, after or before it 'reached' the provider."""

    def __init__(self, fake: AtlasFake, how: str):
        self.fake, self.how = fake, how

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/generateImage"):
            if self.how == "connect":
                raise httpx2.ConnectError("connection refused", request=request)
            await self.fake.handle(request)  # the provider got it and created the job...
            if self.how == "reset":
                raise httpx2.RemoteProtocolError("peer closed connection without response", request=request)
            raise httpx2.ReadTimeout("timed out", request=request)
        return await self.fake.handle(request)


@pytest.mark.parametrize("how", ["reset", "timeout"])
async def test_lost_answer_to_a_submit_is_uncertain_and_never_resent(settings, fake, how):
    async with connect(settings, Broken(fake, how)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error
    assert "may have started the job" in text_of(result) and "did not resend" in text_of(result)
    assert "try again" not in text_of(result).lower().replace("before asking again", "")
    assert len(fake.ledger) == 1


async def test_refused_connection_says_nothing_was_charged(settings, fake):
    async with connect(settings, Broken(fake, "connect")) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "nothing was charged" in text_of(result)
    assert fake.ledger == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_on_submit_are_sent_once(settings, fake, status):
    fake.submit_errors.append((status, {"code": status, "message": "upstream trouble"}, {"retry-after": "0"}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "may or may not have started the job" in text_of(result)
    assert fake.requests.count("POST /api/v1/model/generateImage") == 1


@pytest.mark.parametrize("body", ["not json at all", {"code": 200, "data": {"status": "created"}}, [1, 2]])
async def test_unreadable_submit_answer_is_uncertain_not_failed(settings, fake, body):
    fake.submit_errors.append((200, body, {}))
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.is_error and "no readable prediction id" in text_of(result)
    assert fake.requests.count("POST /api/v1/model/generateImage") == 1


async def test_polls_honour_retry_after_then_succeed(settings, fake):
    fake.poll_errors += [(429, {"message": "slow down"}, {"retry-after": "0"})] * 2
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded"
    assert fake.requests.count("POST /api/v1/model/generateImage") == 1


@pytest.mark.parametrize("body", ["<html><h1>502 Bad Gateway</h1></html>", "{\"code\": 200, \"data\": {\"sta",
                                  {"code": 200, "data": {"status": ["weird"]}}])
async def test_garbage_status_answers_leave_the_job_pending_with_its_id(settings, fake, body):
    fake.poll_errors += [(200, body, {})] * 50
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 1})
    assert not result.is_error
    assert result.structured_content["status"] in ("starting", "processing")
    assert "could not be read" in text_of(result) and result.structured_content["prediction_id"] in text_of(result)


async def test_unknown_status_word_is_not_guessed(settings, fake):
    fake.poll_errors += [(200, {"code": 200, "data": {"status": "exploded"}}, {})] * 50
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 1})
    assert result.structured_content["status"] in ("starting", "processing")
    assert "unknown status 'exploded'" in text_of(result)


async def test_revoked_key_while_waiting_stops_the_wait_and_keeps_the_id(polled_settings, fake):
    fake.poll_errors.append((401, {"code": 401, "message": f"bad key {ATLAS_KEY}"}, {}))
    async with connect(polled_settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert "refused the API key in ATLASCLOUD_API_KEY" in text_of(result)
    assert result.structured_content["prediction_id"] in text_of(result)
    assert_no_canary(text_of(result))


async def test_job_that_never_finishes_comes_back_pending(settings, fake):
    fake.hold = True
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 1.5})
    assert result.structured_content["status"] == "processing" and not result.is_error
    assert len(fake.ledger) == 1


# --- results and downloads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("404", "HTTP 404 (expired or removed)"),
        ("redirect_loop", "more than 5 redirects"),
        ("not_image", "not an image this server can read"),
        ("huge", "over the 2000000-byte limit"),
        ("slow", "no complete answer within 0.5 s"),
        ("bomb", "over the 100000000-pixel limit"),
        ("redirect:http://169.254.169.254/latest/meta-data", "non-public address"),
        ("redirect:http://127.0.0.1:9/x.png", "non-public address"),
        ("redirect:file:///etc/passwd", "only http(s) image URLs"),
    ],
)
async def test_bad_result_files_keep_the_url_and_id_and_leave_no_file(polled_settings, fake, home, mode, expected):
    fake.file_mode = mode
    limits = DownloadLimits(max_bytes=2_000_000, deadline=0.5, attempts=1)
    async with connect(polled_settings, fake, downloads=limits) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
        data = result.structured_content
        assert data["status"] == "succeeded" and data["images"][0]["path"] is None
        assert data["images"][0]["url"].startswith(f"{BASE}/files/")
        assert expected in data["error"] and expected in text_of(result)
        assert "check_prediction" in text_of(result)
        assert files_under(home / "images") == []
        fake.file_mode = "ok"
        retried = await client.call_tool("check_prediction", {"prediction_id": data["prediction_id"]})
    assert Path(retried.structured_content["images"][0]["path"]).is_file()
    assert retried.structured_content["error"] is None
    assert len(fake.ledger) == 1


async def test_output_url_on_a_private_address_is_not_fetched(polled_settings, fake):
    class PrivateOutputs(AtlasFake):
        def _poll(self, job_id, request):
            super()._poll(job_id, request)  # counts the poll; the answer is replaced
            return httpx2.Response(200, json={"code": 200, "data": {
                "id": job_id, "status": "completed", "outputs": ["http://10.0.0.5/internal.png"]}})

    private = PrivateOutputs(key=ATLAS_KEY)
    async with connect(polled_settings, private) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert "non-public address" in result.structured_content["error"]
    assert not any("10.0.0.5" in r for r in private.requests)


async def test_api_redirects_are_not_followed_so_the_key_stays_home(settings, fake):
    seen: list[str] = []

    class Redirecting:
        async def handle(self, request):
            seen.append(f"{request.url.host} {request.headers.get('authorization')}")
            if request.url.path.startswith("/api/v1/model/prediction/"):
                return httpx2.Response(302, headers={"location": "http://evil.test/steal"})
            return await fake.handle(request)

    async with connect(settings, Redirecting()) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 1})
    assert all(not s.startswith("evil.test") for s in seen)
    assert "redirect" in text_of(result)


# --- secrets ---------------------------------------------------------------------------------------


async def test_canary_key_is_nowhere_after_a_run_of_errors(settings, fake, home, workspace, caplog):
    caplog.set_level("DEBUG")
    fake.submit_errors += [
        (401, {"message": f"invalid key {ATLAS_KEY}"}, {}),
        (400, {"message": f"Authorization: Bearer {ATLAS_KEY} rejected"}, {}),
        (500, f"<html>trace: key={ATLAS_KEY[:20]}</html>", {}),
    ]
    fake.outcome = "fail"
    logs: list[str] = []

    async def on_log(params):
        logs.append(str(params))

    texts: list[str] = []
    async with connect(settings, fake, logging_callback=on_log) as client:
        for _ in range(4):
            texts.append((await client.call_tool("generate_image", {"prompt": "p"})).model_dump_json())
    everything = texts + logs + [caplog.text]
    everything += [p.read_bytes().decode("latin-1") for p in files_under(home)]
    everything += [p.read_bytes().decode("latin-1") for p in files_under(workspace)]
    assert_no_canary(*everything)


# --- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "ring the bell\x07"}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "p", "num_images": 1000}, "num_images"),
        ({"prompt": "p", "width": 100000}, "width"),
        ({"prompt": "p", "height": -5}, "height"),
        ({"prompt": "p", "seed": -1}, "seed"),
        ({"prompt": "p", "wait_seconds": 10**6}, "wait_seconds"),
        ({"prompt": "p", "provider": "nope"}, "provider"),
        ({"prompt": "p", "model": "../../etc/passwd"}, "model"),
    ],
)
async def test_bad_arguments_are_refused_naming_the_field_before_any_request(settings, fake, arguments, field):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", arguments)
    assert result.is_error and field in text_of(result)
    assert fake.requests == []


# --- files -----------------------------------------------------------------------------------------


async def test_reads_outside_the_workspace_through_symlinks_devices_and_fifos_are_refused(settings, fake, workspace,
                                                                                           tmp_path):
    import os

    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (workspace / "link.png").symlink_to(secret)
    (workspace / "dir.png").mkdir()
    os.mkfifo(workspace / "fifo.png")
    (workspace / "fake.png").write_text("#!/bin/sh\necho not an image\n")
    cases = {"link.png": "outside the allowed folders", "dir.png": "not a regular file",
             "fifo.png": "not a regular file", "/dev/zero": "outside the allowed folders",
             "/proc/self/environ": "outside the allowed folders", "fake.png": "not an image",
             "missing.png": "No such file"}
    async with connect(settings, fake) as client:
        for path, expected in cases.items():
            up = await client.call_tool("upload_media", {"path": path})
            edit = await client.call_tool("edit_image", {"prompt": "x", "image": path})
            assert up.is_error and expected in text_of(up), (path, text_of(up))
            assert edit.is_error and expected in text_of(edit), (path, text_of(edit))
    assert fake.requests == []


async def test_writes_never_follow_symlinks_or_leave_the_workspace(settings, fake, workspace, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "escape").symlink_to(outside)
    (workspace / "existing-link.png").symlink_to(outside / "target.png")
    async with connect(settings, fake) as client:
        through_dir = await client.call_tool("generate_image", {"prompt": "p", "save_to": "escape/x.png"})
        onto_link = await client.call_tool("generate_image", {"prompt": "p", "save_to": "existing-link.png",
                                                              "overwrite": True})
    assert through_dir.is_error and "outside the allowed folders" in text_of(through_dir)
    assert onto_link.is_error and "symbolic link" in text_of(onto_link)
    assert list(outside.iterdir()) == [] and fake.ledger == []


async def test_oversized_input_file_is_refused(settings, fake, workspace):
    big = workspace / "big.png"
    with big.open("wb") as fh:
        fh.write(png_bytes())
        fh.truncate(51 * 1024 * 1024)
    async with connect(settings, fake) as client:
        result = await client.call_tool("upload_media", {"path": "big.png"})
    assert result.is_error and "limit" in text_of(result) and fake.uploads == {}


# --- transport-independent retry policy -------------------------------------------------------------


async def test_poll_deadline_bounds_a_slow_status_answer(settings, fake):
    class SlowPoll:
        async def handle(self, request):
            if request.url.path.startswith("/api/v1/model/prediction/"):
                import anyio

                await anyio.sleep(5)
            return await fake.handle(request)

    async with connect(settings, SlowPoll(), retry=RetryPolicy(attempts=1, deadline=0.3)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 1})
    assert result.structured_content["status"] in ("starting", "processing")
    assert "did not answer" in text_of(result)
