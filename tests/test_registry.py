"""The provider registry is the one list: settings, secrets, adapters, tool descriptions (the providers
this server has keys for, in registry order), the placeholder's note, `flux-mcp providers` and the
README's tables all agree with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flux_mcp import cli
from flux_mcp.config import Settings
from flux_mcp.providers import PROVIDER_CLASSES, registry
from flux_mcp.providers.placeholder import NOTE
from tests.conftest import connect

ROOT = Path(__file__).resolve().parent.parent
SPECS = registry.SPECS
KEYED = [s for s in SPECS if s.key_env]


def tables(section: str) -> list[list[list[str]]]:
    """Every markdown table in `section`: rows of cells (header and rule rows dropped), backticks removed."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
        elif current:
            found.append(current[2:])
            current = []
    return found


def table_with(section: str, header_cell: str) -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    for table in re.findall(r"(?:^\|.*\n)+", text[start:], re.MULTILINE):
        if header_cell in table.splitlines()[0]:
            return tables(table)[0]
    raise AssertionError(f"README section {section!r} has no table with a {header_cell!r} column")


def test_adapters_are_loaded_from_the_registry_in_its_order_and_take_their_identity_from_it():
    assert [cls.id for cls in PROVIDER_CLASSES] == [s.id for s in SPECS]
    for spec, cls in zip(SPECS, PROVIDER_CLASSES, strict=True):
        assert cls.spec is spec
        assert (cls.id, cls.label, cls.key_env, cls.base_url_env, cls.default_base_url, cls.extra_env) == \
            (spec.id, spec.label, spec.key_env, spec.base_url_env, spec.default_base_url, spec.extra_env)
    assert SPECS[-1] is registry.PLACEHOLDER and registry.PLACEHOLDER.key_env is None


def test_reading_the_settings_loads_no_adapter_code():
    code = ("import sys; import flux_mcp.config as c; c.Settings.from_env({'FLUX_MCP_HOME': '.'}); "
            "print(sorted(m for m in sys.modules if m.startswith('flux_mcp.providers.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["flux_mcp.providers.registry"]


def test_settings_read_every_declared_variable(tmp_path):
    env = {"FLUX_MCP_HOME": str(tmp_path)}
    for spec in KEYED:
        env[spec.key_env] = f"key-of-{spec.id}"  # type: ignore[index]
        env[spec.base_url_env] = f"http://{spec.id}.test"  # type: ignore[index]
        env.update({v.env: f"{v.name}-value" for v in spec.extras})
    settings = Settings.from_env(env, cwd=tmp_path)
    assert list(settings.providers) == [s.id for s in SPECS]
    for spec in KEYED:
        got = settings.providers[spec.id]
        assert got.api_key is not None and got.api_key.get_secret_value() == f"key-of-{spec.id}"
        assert got.base_url == f"http://{spec.id}.test"
        assert got.extra == {v.name: f"{v.name}-value" for v in spec.extras}
    defaults = Settings.from_env({"FLUX_MCP_HOME": str(tmp_path)}, cwd=tmp_path)
    assert {pid: p.base_url for pid, p in defaults.providers.items()} == \
        {s.id: s.default_base_url or "" for s in SPECS}


def test_secrets_are_the_keys_and_the_variables_declared_secret_and_nothing_else(tmp_path):
    env = {"FLUX_MCP_HOME": str(tmp_path), "FLUX_MCP_AUTH_TOKEN": "bearer-secret"}
    for spec in KEYED:
        env[spec.key_env] = f"key-of-{spec.id}"  # type: ignore[index]
        env.update({v.env: f"{v.env}-value" for v in spec.extras})
    secrets = set(Settings.from_env(env, cwd=tmp_path).secrets())
    declared = {f"{v.env}-value" for s in SPECS for v in s.extras if v.secret}
    assert secrets == {f"key-of-{s.id}" for s in KEYED} | declared | {"bearer-secret"}
    assert "ACEDATACLOUD_PLATFORM_TOKEN-value" in declared  # an upload token is a credential
    assert "IMAGEPIPELINE_SERVER_ID-value" not in secrets  # a server id is not, whatever its name


def test_the_default_is_the_first_provider_with_a_key_in_registry_order(tmp_path):
    home = {"FLUX_MCP_HOME": str(tmp_path)}
    assert registry.default_provider(Settings.from_env(home, cwd=tmp_path)) == "placeholder"
    for later, earlier in zip(KEYED[1:], KEYED, strict=False):
        both = {**home, earlier.key_env: "k1", later.key_env: "k2"}  # type: ignore[dict-item]
        assert registry.default_provider(Settings.from_env(both, cwd=tmp_path)) == earlier.id
    chosen = {**home, KEYED[0].key_env: "k", "FLUX_MCP_PROVIDER": KEYED[-1].id}  # type: ignore[dict-item]
    assert registry.default_provider(Settings.from_env(chosen, cwd=tmp_path)) == KEYED[-1].id


def test_the_placeholder_note_names_every_key_variable_in_order():
    named = re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", NOTE)
    assert named == [s.key_env for s in KEYED]


@pytest.mark.anyio
@pytest.mark.parametrize(("keys", "chosen"), [
    ((), None),
    ((0,), None),
    ((1, 3), None),
    ((1, 3), 3),
    ((0,), 2),  # FLUX_MCP_PROVIDER names a provider without a key: it is still the default, and named
    (tuple(range(len(KEYED))), None),
])
async def test_the_provider_parameter_names_the_configured_providers_in_registry_order_and_the_default(
        make_settings, keys, chosen):
    env = {KEYED[i].key_env: f"key-{i}" for i in keys}
    if chosen is not None:
        env["FLUX_MCP_PROVIDER"] = KEYED[chosen].id
    settings = make_settings(**env)
    default = registry.default_provider(settings)
    expected = [s.id for s in SPECS if s.id == default or any(s is KEYED[i] for i in keys)]
    async with connect(settings) as client:
        tools = (await client.list_tools()).tools
    # list_predictions' provider filters the history (any provider ever used), it does not choose one.
    tools = [t for t in tools if t.name != "list_predictions"]
    described = [t for t in tools if "description" in t.input_schema["properties"].get("provider", {})]
    assert "generate_image" in {t.name for t in described}
    for tool in tools:  # the others say their provider is generate_image's
        if "provider" in tool.input_schema["properties"] and tool not in described:
            assert "as generate_image" in (tool.description or ""), tool.name
    for tool in described:
        listed = [p.strip() for p in tool.input_schema["properties"]["provider"]["description"].split(",")]
        assert [p.removesuffix(" (default)") for p in listed] == expected, tool.name
        assert [p for p in listed if p.endswith(" (default)")] == [f"{default} (default)"], tool.name
    assert all("provider" in t.input_schema["properties"] for t in tools if t.name != "check_prediction")


def test_providers_command_lists_the_registry(tmp_path, capsys):
    settings = Settings.from_env({"FLUX_MCP_HOME": str(tmp_path), KEYED[1].key_env: "k"}, cwd=tmp_path)  # type: ignore[dict-item]
    assert cli._providers(settings, as_json=True) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default"] == KEYED[1].id
    assert [(p["id"], p["label"], p["key_variable"]) for p in listing["providers"]] == \
        [(s.id, s.label, s.key_env) for s in SPECS]
    assert cli._providers(settings, as_json=False) == 0
    table = capsys.readouterr().out.split("\nModels:")[0].splitlines()[1:]
    assert [line.split()[0] for line in table] == [s.id for s in SPECS]
    for spec, line in zip(SPECS, table, strict=True):
        expected = "configured" if spec.key_env in (None, KEYED[1].key_env) else f"set {spec.key_env}"
        assert expected in line, line


def test_readme_provider_table_matches_the_registry():
    rows = table_with("Providers", "key variable")
    assert [(r[0], r[1]) for r in rows] == [(s.id, s.key_env or "none") for s in SPECS]


def test_readme_base_url_table_matches_the_registry():
    rows = table_with("Providers", "base URL variable")
    expected = [(s.id, s.key_env or "none", s.base_url_env or "none") for s in SPECS]
    assert [(r[0], r[1], r[2]) for r in rows] == expected
    assert [r[3] for r in rows if r[0] != "placeholder"] == [s.default_base_url for s in KEYED]


def test_readme_configuration_table_names_every_extra_variable_and_the_default_order():
    rows = table_with("Configuration", "meaning")
    documented = {name.strip().strip("`") for row in rows for name in row[0].split(",")}
    missing = [v.env for s in SPECS for v in s.extras if v.env not in documented]
    assert not missing, f"README's configuration table lacks {missing}"
    [provider_row] = [r for r in rows if r[0] == "FLUX_MCP_PROVIDER"]
    order = re.search(r"first configured of ([a-z, ]+);", provider_row[2])
    assert order is not None, provider_row[2]
    assert [p.strip() for p in order.group(1).split(",")] == [s.id for s in KEYED]
