"""Each of the five providers through the real `flux-mcp` over stdio, against its fake on loopback.

What a new user checks: with one provider's key and base URL pointing at a faithful fake, an MCP
client gets images from generate_image, and check_prediction on the returned id gives them again,
also from a restarted server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import text_of
from tests.fakes.acedatacloud import AceDataFake
from tests.fakes.appypie import AppyPieFake
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.imagepipeline import ImagePipelineFake
from tests.fakes.segmind import SegmindFake
from tests.fakes.wire import serve_on_loopback
from tests.subprocess_helpers import child_env

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]


@dataclass
class Case:
    provider: str
    make: Callable[[str], Any]
    key_env: str
    base_env: str
    extra_base_envs: tuple[str, ...] = ()


KEY = "stdio-canary-4e7a9c1f2b6d8e03a5"
CASES = [
    Case("atlascloud", lambda k: AtlasFake(key=k), "ATLASCLOUD_API_KEY", "ATLASCLOUD_BASE_URL"),
    Case("segmind", lambda k: SegmindFake(key=k), "SEGMIND_API_KEY", "SEGMIND_BASE_URL", ("SEGMIND_UPLOAD_BASE_URL",)),
    Case("acedatacloud", lambda k: AceDataFake(token=k), "ACEDATACLOUD_API_TOKEN", "ACEDATACLOUD_BASE_URL"),
    Case("imagepipeline", lambda k: ImagePipelineFake(key=k), "IMAGEPIPELINE_API_KEY", "IMAGEPIPELINE_BASE_URL"),
    Case("appypie", lambda k: AppyPieFake(key=k), "APPYPIE_SUBSCRIPTION_KEY", "APPYPIE_BASE_URL"),
]


def params(env: dict[str, str], cwd: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env, cwd=str(cwd))


@pytest.mark.parametrize("case", CASES, ids=[c.provider for c in CASES])
async def test_provider_over_stdio_generates_and_checks_again_after_a_restart(case, home, workspace):
    fake = case.make(KEY)
    with serve_on_loopback(fake) as url:
        env = child_env(home, **{case.key_env: KEY, case.base_env: url},
                        **dict.fromkeys(case.extra_base_envs, url))
        async with Client(params(env, workspace)) as client:
            result = await client.call_tool("generate_image", {"prompt": "a teapot on a desk", "num_images": 2})
            data = result.structured_content
            assert data["provider"] == case.provider and data["status"] == "succeeded", text_of(result)
            again = await client.call_tool("check_prediction", {"prediction_id": data["prediction_id"]})
        async with Client(params(env, workspace)) as client:  # restarted
            after_restart = await client.call_tool("check_prediction", {"prediction_id": data["prediction_id"]})
    assert len(data["images"]) == 2 and all(Path(i["path"]).is_file() for i in data["images"])
    assert again.structured_content == data and after_restart.structured_content == data
    assert len(fake.ledger) == (2 if case.provider in ("segmind", "appypie") else 1)
    assert KEY not in text_of(result)
