"""Redaction at the boundary: a planted sixth adapter that echoes its key, unscrubbed, in every field it
can (error text, failure reason, status message, output URL, its own log lines) leaks it nowhere —
not in a tool result, a progress message, a log record, the journal or any file of the data folder."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import pytest

from flux_mcp.config import Settings
from flux_mcp.errors import ProviderRejected, ProviderUnavailable, SubmitOutcomeUnknown
from flux_mcp.providers import registry
from flux_mcp.providers.base import ImageRequest, JobState, ModelInfo, OutputRef, Provider, Range, Submitted
from flux_mcp.providers.registry import ProviderSpec
from tests.conftest import connect, text_of
from tests.fakes.wire import png_bytes

pytestmark = pytest.mark.anyio
PLANTED_KEY = "planted-canary-4e8a1c9d7b3f5e2a06"
WINDOW = 12
log = logging.getLogger("flux_mcp.providers.planted")


PLANTED = ProviderSpec("planted", "Planted", "PLANTED_API_KEY", "PLANTED_BASE_URL", "http://planted.test",
                       "tests.test_redaction:Planted")



class Planted(Provider):
    """An adapter written carelessly: every piece of provider text carries the key, and nothing is scrubbed."""

    spec = PLANTED
    models = (ModelInfo("planted-1", frozenset({"generate"}), "echoes its key", size=Range(16, 2048),
                        max_images=2),)
    default_model = "planted-1"
    jobs: ClassVar[dict[str, str]] = {}

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        key = self.key()
        log.warning("submitting with key %s", key)
        if req.prompt == "refuse":
            raise ProviderRejected(f"planted refused the key {key}: bad request for {key}", status_code=400)
        if req.prompt == "unknown":
            raise SubmitOutcomeUnknown(f"planted sent {key} and heard nothing")
        native = uuid.uuid4().hex
        self.jobs[native] = req.prompt
        return Submitted(native_id=native)

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        key = self.key()
        prompt = self.jobs[native_id]
        polls = self.jobs.get(native_id + ":polls", "")
        self.jobs[native_id + ":polls"] = polls + "x"
        log.info("polling %s with %s", native_id, key)
        if len(polls) == 0:
            return JobState(status="processing", message=f"queued behind {key}")
        if prompt == "flaky" and len(polls) == 1:
            raise ProviderUnavailable(f"status check for {key} timed out")
        if prompt == "fail":
            return JobState(status="failed", error=f"the job for key={key} failed: {key}")
        return JobState(status="succeeded", error=f"made with {key}",
                        outputs=[OutputRef(url=f"{self.base_url}/img.png?token={key}"),
                                 OutputRef(url=f"{self.base_url}/missing.png?token={key}")])


def planted_files(request: httpx2.Request) -> httpx2.Response:
    if request.url.path == "/img.png":
        return httpx2.Response(200, content=png_bytes(32, 32), headers={"content-type": "image/png"})
    return httpx2.Response(404, text=f"no such file for {request.url.params.get('token')}")


class PlantedFake:
    def __init__(self) -> None:
        self.requests: list[str] = []

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(str(request.url))
        return planted_files(request)


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Planted]]:
    """Registers the planted adapter as a sixth provider, the way a new adapter joins: one registry line."""
    monkeypatch.setattr(registry, "SPECS", (*registry.SPECS[:-1], PLANTED, registry.SPECS[-1]))
    monkeypatch.setattr(registry, "BY_ID", {s.id: s for s in registry.SPECS})
    Planted.jobs = {}
    yield Planted


@pytest.fixture
def planted_settings(planted: type[Planted], make_settings: Any) -> Settings:
    settings: Settings = make_settings(PLANTED_API_KEY=PLANTED_KEY, FLUX_MCP_PROVIDER="planted")
    return settings


def leaks(text: str) -> list[str]:
    """The key, or any 12-character piece of it, found in `text`."""
    pieces = {PLANTED_KEY[i:i + WINDOW] for i in range(len(PLANTED_KEY) - WINDOW + 1)}
    return sorted(p for p in pieces if p in text)


def assert_no_leak_in_home(home: Path) -> None:
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes().decode("latin-1")
            assert not leaks(data), f"{path} holds a piece of the key"


@pytest.mark.parametrize("prompt", ["refuse", "unknown", "fail", "flaky", "ok"])
async def test_a_key_echoed_in_every_field_reaches_no_result_progress_log_journal_or_file(
        planted_settings: Settings, home: Path, prompt: str, caplog: pytest.LogCaptureFixture):
    fake = PlantedFake()
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with caplog.at_level(logging.DEBUG):
        async with connect(planted_settings, fake) as client:
            result = await client.call_tool("generate_image", {"prompt": prompt, "num_images": 2, "wait_seconds": 30},
                                            progress_callback=on_progress)
            seen = [result]
            sc = result.structured_content or {}
            if sc.get("prediction_id"):
                seen.append(await client.call_tool("check_prediction", {"prediction_id": sc["prediction_id"]}))
                resource = await client.read_resource(f"flux://predictions/{sc['prediction_id']}")
                seen.append(resource)
    everything = [json.dumps(r.model_dump(mode="json", by_alias=True)) for r in seen]
    assert not leaks("\n".join(everything)), everything
    assert not leaks("\n".join(progress)), progress
    assert not leaks(caplog.text), caplog.text
    assert_no_leak_in_home(home)
    # The adapter really did echo the key (the test would prove nothing otherwise) ...
    assert any(PLANTED_KEY in r.getMessage() or "[redacted]" in r.getMessage() for r in caplog.records)
    text = text_of(result)
    # ... and the results still say what happened.
    expected = {"refuse": "refused", "unknown": "heard nothing", "fail": "failed", "flaky": "Generated",
                "ok": "Generated"}[prompt]
    assert expected in text, text
    if prompt in ("ok", "flaky"):
        assert sc["status"] == "succeeded" and sc["images"][0]["path"]
        assert "[redacted]" in (sc["images"][0]["url"] or "")
        assert any("processing" in m for m in progress)
