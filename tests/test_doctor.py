"""`flux-mcp doctor`: every configured provider's key and base URL checked against its fake, nothing paid."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from flux_mcp import cli, doctor
from flux_mcp.config import Settings
from flux_mcp.providers import registry
from tests.fakes.acedatacloud import AceDataFake
from tests.fakes.appypie import AppyPieFake
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.base import FakeBase
from tests.fakes.imagepipeline import ImagePipelineFake
from tests.fakes.segmind import SegmindFake

pytestmark = pytest.mark.anyio

KEYS = {
    "atlascloud": "atlas-doctor-canary-0a1b2c3d4e5f6a7b",
    "segmind": "SG_d0c70rcanary1234",
    "acedatacloud": "ace-doctor-canary-9f8e7d6c5b4a3210",
    "imagepipeline": "ip_live_doctorcanary55aa66bb",
    "appypie": "appy-doctor-canary-77cc88dd99ee",
}
HOSTS = {pid: f"{pid}.test" for pid in KEYS}


def _fakes() -> dict[str, FakeBase]:
    return {
        "atlascloud": AtlasFake(key=KEYS["atlascloud"]),
        "segmind": SegmindFake(key=KEYS["segmind"]),
        "acedatacloud": AceDataFake(token=KEYS["acedatacloud"]),
        "imagepipeline": ImagePipelineFake(key=KEYS["imagepipeline"]),
        "appypie": AppyPieFake(key=KEYS["appypie"]),
    }


def _env(keys: dict[str, str] | None = None) -> dict[str, str]:
    env = {}
    for pid, key in (keys or KEYS).items():
        spec = registry.BY_ID[pid]
        assert spec.key_env and spec.base_url_env
        env[spec.key_env] = key
        env[spec.base_url_env] = f"http://{HOSTS[pid]}"
    return env


Handler = Callable[[httpx2.Request], httpx2.Response]


def _client(fakes: dict[str, FakeBase], special: dict[str, Handler]) -> httpx2.AsyncClient:
    """One client whose requests go to the fake named by their host (or to a handler in `special`)."""
    by_host = {HOSTS[pid]: fake for pid, fake in fakes.items()}

    async def handle(request: httpx2.Request) -> httpx2.Response:
        host = request.url.host
        if host in special:
            return special[host](request)
        return await by_host[host].handle(request)

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handle))


async def _run(settings: Settings, fakes: dict[str, FakeBase], *, as_json: bool = False,
               special: dict[str, Handler] | None = None) -> tuple[int, str]:
    async with _client(fakes, special or {}) as http:
        return await doctor.run(settings, as_json=as_json, client=http)


def _verdicts(text: str) -> dict[str, str]:
    return {row["provider"]: row["verdict"] for row in json.loads(text)["providers"]}


def _assert_no_key(text: str) -> None:
    for key in KEYS.values():
        assert key not in text and key[:12] not in text


def _assert_nothing_paid(fakes: dict[str, FakeBase]) -> None:
    for pid, fake in fakes.items():
        assert fake.ledger == [], pid


async def test_doctor_reports_every_provider_ok_with_right_keys_and_pays_nothing(
        make_settings: Callable[..., Settings]) -> None:
    fakes = _fakes()
    code, text = await _run(make_settings(**_env()), fakes)
    assert code == 0
    rows = {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}
    for pid in ("atlascloud", "segmind", "acedatacloud", "imagepipeline"):
        assert " OK " in rows[pid], rows[pid]
    assert "NOT CHECKED" in rows["appypie"] and "without paying" in rows["appypie"]
    _assert_nothing_paid(fakes)
    assert all(len(f.requests) == 1 for f in fakes.values())  # one request each, no retry
    assert "POST /flux-1-schnell/v1/getData" in fakes["appypie"].requests
    assert fakes["appypie"].presented is None  # AppyPie's key is never sent to its paid endpoint
    _assert_no_key(text)


async def test_doctor_names_the_variable_of_a_wrong_key_and_exits_1(
        make_settings: Callable[..., Settings]) -> None:
    fakes = _fakes()
    wrong = {**KEYS, "segmind": "SG_wrongwrongwrong00", "acedatacloud": "ace-wrong-token-000000000000"}
    code, text = await _run(make_settings(**_env(wrong)), fakes)
    assert code == 1
    lines = text.splitlines()
    segmind = next(line for line in lines if line.startswith("segmind "))
    assert "KEY REFUSED" in segmind and "SEGMIND_API_KEY" in segmind
    ace = next(line for line in lines if line.startswith("acedatacloud "))
    assert "KEY REFUSED" in ace and "ACEDATACLOUD_API_TOKEN" in ace
    assert "fix: SEGMIND_API_KEY" in text and "fix: ACEDATACLOUD_API_TOKEN" in text
    assert next(line for line in lines if line.startswith("atlascloud ")).split()[1] == "OK"
    _assert_nothing_paid(fakes)
    for key in wrong.values():
        assert key not in text


async def test_doctor_reports_a_refused_atlas_key_as_json(make_settings: Callable[..., Settings]) -> None:
    fakes = _fakes()
    code, text = await _run(make_settings(**_env({**KEYS, "atlascloud": "atlas-wrong-key-0000000000"})), fakes,
                            as_json=True)
    assert code == 1
    found = json.loads(text)
    assert found["ok"] is False
    atlas = next(row for row in found["providers"] if row["provider"] == "atlascloud")
    assert atlas["verdict"] == "KEY REFUSED" and atlas["fix"] == "ATLASCLOUD_API_KEY" and atlas["ok"] is False
    assert _verdicts(text) == {"atlascloud": "KEY REFUSED", "segmind": "OK", "acedatacloud": "OK",
                               "imagepipeline": "OK", "appypie": "NOT CHECKED"}
    _assert_nothing_paid(fakes)
    assert "atlas-wrong-key" not in text


async def test_doctor_reports_a_base_url_that_cannot_be_reached(make_settings: Callable[..., Settings]) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    fakes = _fakes()
    code, text = await _run(make_settings(**_env()), fakes, as_json=True, special={HOSTS["imagepipeline"]: refuse})
    assert code == 1
    row = next(r for r in json.loads(text)["providers"] if r["provider"] == "imagepipeline")
    assert row["verdict"] == "UNREACHABLE" and row["fix"] == "IMAGEPIPELINE_BASE_URL"
    assert "ConnectError" in row["detail"]
    assert _verdicts(text)["atlascloud"] == "OK"


async def test_doctor_says_a_base_url_answering_a_web_page_is_not_the_api(
        make_settings: Callable[..., Settings]) -> None:
    def web_page(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, text="<html><body>Welcome</body></html>", headers={"content-type": "text/html"})

    fakes = _fakes()
    code, text = await _run(make_settings(**_env()), fakes,
                            special={HOSTS["atlascloud"]: web_page, HOSTS["appypie"]: web_page})
    assert code == 1
    atlas = next(line for line in text.splitlines() if line.startswith("atlascloud "))
    assert "NOT THE API" in atlas and "ATLASCLOUD_BASE_URL looks wrong" in atlas
    assert "NOT THE API" in next(line for line in text.splitlines() if line.startswith("appypie "))
    assert "fix: ATLASCLOUD_BASE_URL" in text and "fix: APPYPIE_BASE_URL" in text


async def test_doctor_keeps_a_provider_echoing_the_key_out_of_the_output(
        make_settings: Callable[..., Settings]) -> None:
    def echo(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(500, json={"code": 500, "message": f"bad key {KEYS['atlascloud']}"})

    fakes = _fakes()
    for fake in fakes.values():
        fake.echo_key = True
    code, text = await _run(make_settings(**_env()), fakes, as_json=True, special={HOSTS["atlascloud"]: echo})
    assert code == 1
    assert _verdicts(text)["atlascloud"] == "UNKNOWN"
    assert "HTTP 500" in text
    _assert_no_key(text)


async def test_doctor_lists_unconfigured_providers_with_the_variable_to_set(
        make_settings: Callable[..., Settings]) -> None:
    fakes = _fakes()
    only_atlas = {"atlascloud": KEYS["atlascloud"]}
    code, text = await _run(make_settings(**_env(only_atlas)), fakes, as_json=True)
    assert code == 0
    rows = {r["provider"]: r for r in json.loads(text)["providers"]}
    assert rows["atlascloud"]["verdict"] == "OK"
    assert rows["segmind"]["verdict"] == "NOT CONFIGURED" and rows["segmind"]["configured"] is False
    assert "set SEGMIND_API_KEY" in rows["segmind"]["detail"] and rows["segmind"]["fix"] == "SEGMIND_API_KEY"
    assert all(fakes[pid].requests == [] for pid in KEYS if pid != "atlascloud")


def test_doctor_command_without_keys_prints_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUX_MCP_HOME", str(tmp_path / "home"))
    for spec in registry.SPECS:
        for variable in spec.variables:
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("FLUX_MCP_PROVIDER", raising=False)
    assert cli.main(["doctor", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["providers"]
    assert [r["provider"] for r in rows] == [s.id for s in registry.keyed()]
    assert {r["verdict"] for r in rows} == {"NOT CONFIGURED"}
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "set ATLASCLOUD_API_KEY" in out and "no provider is configured" in out
