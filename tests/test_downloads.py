"""Result outputs and downloads: what a provider's answer points at, and what this server agrees to fetch.

* Outputs that are not absolute http(s) URLs: a path on the provider's host is resolved against its base
  URL and kept; `file:`, `s3:`, `//host` and other schemes end the job as failed, with a reason, after
  one status request (they used to be taken for base64 and polled until the wait ran out).
* Downloads trust the provider's origin (scheme, host and port), not its host name: with a loopback
  gateway as base URL, another port on the same host is refused, also behind a redirect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from flux_mcp.media import DownloadLimits
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.acedatacloud import AceDataFake
from tests.fakes.appypie import AppyPieFake
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.imagepipeline import ImagePipelineFake
from tests.fakes.segmind import SegmindFake
from tests.fakes.wire import Fake

pytestmark = pytest.mark.anyio

SEGMIND_KEY = "SG_0a1b2c3d4e5f6a7b"
ACE_TOKEN = "acedata-downloads-3c5e7a9b1d2f4e6a"
IP_KEY = "ip_live_downloads-8f6e4d2c0b9a"
APPYPIE_KEY = "appypie-downloads-1f3e5d7c9b2a"

PROVIDERS: dict[str, tuple[Callable[[], Any], dict[str, str]]] = {
    "atlascloud": (lambda: AtlasFake(key=ATLAS_KEY),
                   {"ATLASCLOUD_API_KEY": ATLAS_KEY, "ATLASCLOUD_BASE_URL": "http://atlas.test",
                    "ATLASCLOUD_SYNC_MODE": "off"}),
    "segmind": (lambda: SegmindFake(key=SEGMIND_KEY, answer="json-image-url"),
                {"SEGMIND_API_KEY": SEGMIND_KEY, "SEGMIND_BASE_URL": "http://segmind.test"}),
    "acedatacloud": (lambda: AceDataFake(token=ACE_TOKEN),
                     {"ACEDATACLOUD_API_TOKEN": ACE_TOKEN, "ACEDATACLOUD_BASE_URL": "http://acedata.test"}),
    "imagepipeline": (lambda: ImagePipelineFake(key=IP_KEY, answer="pending"),
                      {"IMAGEPIPELINE_API_KEY": IP_KEY, "IMAGEPIPELINE_BASE_URL": "http://imagepipeline.test"}),
    "appypie": (lambda: AppyPieFake(key=APPYPIE_KEY),
                {"APPYPIE_SUBSCRIPTION_KEY": APPYPIE_KEY, "APPYPIE_BASE_URL": "http://appypie.test"}),
}


class Rewriting:
    """Answers as `fake` does, with every result URL on the fake's own host (`.../files/...`) replaced by
    `rewrite(url)`; records every URL asked for."""

    def __init__(self, fake: Fake, rewrite: Callable[[str], str]):
        self.fake, self.rewrite = fake, rewrite
        self.urls: list[str] = []

    def api_calls(self) -> list[str]:
        return [u for u in self.urls if "/files/" not in u]

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.urls.append(str(request.url))
        response = await self.fake.handle(request)
        if "json" not in response.headers.get("content-type", ""):
            return response
        own = f"{request.url.scheme}://{request.url.netloc.decode()}/files/"

        def walk(value: Any) -> Any:
            if isinstance(value, str) and value.startswith(own):
                return self.rewrite(value)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        dropped = ("content-length", "content-type")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in dropped}
        return httpx2.Response(response.status_code, json=walk(json.loads(response.content)), headers=headers)


def path_only(url: str) -> str:
    return "/" + url.split("/", 3)[3]


# --- outputs that are not absolute http(s) URLs -----------------------------------------------------


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("relative", [path_only, lambda url: path_only(url).lstrip("/")],
                         ids=["rooted", "no-leading-slash"])
async def test_a_relative_output_is_fetched_from_the_providers_base_url(make_settings, provider, relative):
    make_fake, env = PROVIDERS[provider]
    wire = Rewriting(make_fake(), relative)
    with anyio.fail_after(20):
        async with connect(make_settings(**env), wire) as client:
            result = await client.call_tool("generate_image", {"prompt": "p", "provider": provider})
    data = result.structured_content
    assert data["status"] == "succeeded" and data["error"] is None, text_of(result)
    [image] = data["images"]
    assert Path(image["path"]).is_file()
    assert image["url"].startswith(env[f"{provider.upper()}_BASE_URL"] + "/files/")
    assert len(wire.api_calls()) <= 2


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize(("output", "reason"), [
    ("file:///etc/passwd", "the file: scheme"),
    ("s3://bucket/outputs/x.png", "the s3: scheme"),
    ("//evil.test/files/x.png", "without a scheme"),
    ("ftp://evil.test/x.png", "the ftp: scheme"),
    ("the image is ready", "neither an http(s) URL nor image data"),
])
async def test_an_output_that_cannot_be_fetched_fails_the_job_at_once(make_settings, provider, output,
                                                                       reason):
    make_fake, env = PROVIDERS[provider]
    wire = Rewriting(make_fake(), lambda url: output)
    with anyio.fail_after(20):
        async with connect(make_settings(**env), wire) as client:
            result = await client.call_tool("generate_image", {"prompt": "p", "provider": provider})
            again = await client.call_tool("check_prediction",
                                           {"prediction_id": result.structured_content["prediction_id"]})
    data = result.structured_content
    assert result.is_error and data["status"] == "failed", text_of(result)
    assert reason in data["error"] and data["images"] == []
    assert again.structured_content["status"] == "failed"
    assert len(wire.api_calls()) <= 2  # one submit, at most one status request: no polling on and on
    assert not any("evil.test" in u for u in wire.urls)


async def test_one_unusable_output_among_several_keeps_the_others_and_says_so(make_settings):
    make_fake, env = PROVIDERS["atlascloud"]
    seen: list[str] = []

    def second_is_s3(url: str) -> str:
        seen.append(url)
        return "s3://bucket/x.png" if len(seen) % 2 == 0 else url

    wire = Rewriting(make_fake(), second_is_s3)
    async with connect(make_settings(**env), wire) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 2})
    data = result.structured_content
    assert data["status"] == "succeeded" and len(data["images"]) == 1
    assert "output 2 of 2 is a URL with the s3: scheme" in data["error"]


# --- the provider's origin, not its host name -----------------------------------------------------------


LOCAL = "http://127.0.0.1:8123"
"""A local gateway as the provider's base URL (behind MockTransport: no socket is opened)."""


@pytest.fixture
def local_settings(make_settings):
    return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=LOCAL, ATLASCLOUD_SYNC_MODE="off")


async def test_outputs_on_the_providers_own_origin_are_fetched(local_settings):
    wire = Rewriting(AtlasFake(key=ATLAS_KEY), lambda url: url)
    async with connect(local_settings, wire) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    [image] = result.structured_content["images"]
    assert image["url"].startswith(f"{LOCAL}/files/") and Path(image["path"]).is_file()


@pytest.mark.parametrize("elsewhere", ["http://127.0.0.1:8124", "https://127.0.0.1:8123", "http://localhost:8123"])
async def test_another_port_or_scheme_on_the_providers_host_is_refused(local_settings, home, elsewhere):
    wire = Rewriting(AtlasFake(key=ATLAS_KEY), lambda url: url.replace(LOCAL, elsewhere))
    async with connect(local_settings, wire, downloads=DownloadLimits(attempts=1)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    data = result.structured_content
    assert data["status"] == "succeeded" and data["images"][0]["path"] is None
    assert "non-public address" in data["error"]
    assert not any(u.startswith(elsewhere) for u in wire.urls)
    assert not (home / "images").exists() or not any(p.is_file() for p in (home / "images").rglob("*"))


async def test_a_redirect_from_the_providers_origin_to_another_port_is_refused(local_settings):
    fake = AtlasFake(key=ATLAS_KEY, file_mode="redirect:http://127.0.0.1:8124/internal.png")
    wire = Rewriting(fake, lambda url: url)
    async with connect(local_settings, wire, downloads=DownloadLimits(attempts=1)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    data = result.structured_content
    assert data["images"][0]["path"] is None and "non-public address" in data["error"]
    assert any(u.startswith(f"{LOCAL}/files/") for u in wire.urls)
    assert not any(u.startswith("http://127.0.0.1:8124") for u in wire.urls)


# --- the shared retry loop and body cap, on images --------------------------------------------------------


class FlakyFiles:
    """The Atlas fake, whose result files answer 503 (with Retry-After) `failures` times first."""

    def __init__(self, fake: AtlasFake, failures: int):
        self.fake, self.failures, self.file_requests = fake, failures, 0

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.startswith("/files/"):
            self.file_requests += 1
            if self.file_requests <= self.failures:
                return httpx2.Response(503, text="busy", headers={"retry-after": "0"})
        return await self.fake.handle(request)


async def test_a_busy_image_host_is_asked_again(polled_settings):
    wire = FlakyFiles(AtlasFake(key=ATLAS_KEY), failures=2)
    async with connect(polled_settings, wire, downloads=DownloadLimits(attempts=3)) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert Path(result.structured_content["images"][0]["path"]).is_file()
    assert wire.file_requests == 3


async def test_an_image_over_the_cap_is_not_downloaded_again(polled_settings):
    fake = AtlasFake(key=ATLAS_KEY, file_mode="huge")
    wire = FlakyFiles(fake, failures=0)
    limits = DownloadLimits(max_bytes=2_000_000, attempts=3)
    async with connect(polled_settings, wire, downloads=limits) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert "over the 2000000-byte limit" in result.structured_content["error"]
    assert wire.file_requests == 1
