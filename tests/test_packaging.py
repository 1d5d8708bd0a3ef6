"""How people install flux-mcp: the wheel and its two commands, the MCP Bundle, the MCP Registry entry.

- `pip install .` gives the distribution `flux-image-mcp` (the PyPI name `flux-mcp` is another
  project's) with two commands, `flux-mcp` and `flux-image-mcp`: a wheel is built with `pip wheel`,
  installed into a fresh virtual environment (its dependencies from pip's configured index) and both
  commands are run.
- The Claude Desktop bundle (`mcpb/manifest.json`, built by `scripts/build_mcpb.py`) is checked by
  the official CLI, npm `@anthropic-ai/mcpb`, installed here into `.cache/npm/mcpb`: `mcpb validate`
  and `mcpb pack`. No npm, or no registry, is a failure, never a skip.
- `server.json`, the entry for the official MCP Registry, is validated with `jsonschema` (formats
  checked too) against the registry's server.json schema version 2025-12-11, the latest released one
  in the registry's changelog (modelcontextprotocol/registry, docs/reference/server-json/CHANGELOG.md).
  The schema is kept byte for byte in tests/data/mcp-registry-server-2025-12-11.schema.json, as
  published at https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json (the
  repository modelcontextprotocol/static, generated from the registry's openapi.yaml), sha256
  3fba09590c99f61735d234822279f4223fab9e300c0a81e81c91ab62a4114de0.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import jsonschema
import pytest
from mcp import Client, StdioServerParameters

from flux_mcp.config import Settings
from flux_mcp.providers import PROVIDER_CLASSES
from tests.npm_tools import PREFIX as NPM_PREFIX
from tests.subprocess_helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "tests" / "data" / "mcp-registry-server-2025-12-11.schema.json"
SCHEMA_SHA256 = "3fba09590c99f61735d234822279f4223fab9e300c0a81e81c91ab62a4114de0"
MCPB_PREFIX = NPM_PREFIX / "mcpb"
INSTALL_TIMEOUT = 900


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def manifest() -> dict[str, Any]:
    return json.loads((ROOT / "mcpb" / "manifest.json").read_text(encoding="utf-8"))


def server_json() -> dict[str, Any]:
    return json.loads((ROOT / "server.json").read_text(encoding="utf-8"))


def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_mcpb", ROOT / "scripts" / "build_mcpb.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def secret_variables() -> set[str]:
    """What flux-mcp treats as secret (Settings.secrets): each provider's key, and extras named token/key."""
    names = {cls.key_env for cls in PROVIDER_CLASSES if cls.key_env}
    names |= {var for cls in PROVIDER_CLASSES for name, var in cls.extra_env.items()
              if "token" in name or "key" in name}
    return names


def pip_env() -> dict[str, str]:
    """pip as configured on this machine (its index settings), without this test run's virtual environment."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


# --- the distribution: pip install . ----------------------------------------------------------------

@pytest.mark.subprocess
def test_pip_install_gives_both_commands_with_the_distribution_version(tmp_path):
    version = pyproject()["version"]
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                            str(ROOT)], env=pip_env(), capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    [wheel] = wheels.glob("*.whl")
    assert wheel.name.startswith(f"flux_image_mcp-{version}-")
    with zipfile.ZipFile(wheel) as zf:
        info = f"flux_image_mcp-{version}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        scripts = zf.read(f"{info}/entry_points.txt").decode()
    assert "\nName: flux-image-mcp\n" in metadata
    assert "flux-mcp = flux_mcp.cli:main" in scripts and "flux-image-mcp = flux_mcp.cli:main" in scripts

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=pip_env())
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=pip_env(),
                               capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                               stdin=subprocess.DEVNULL, check=False)
    assert installed.returncode == 0, installed.stderr[-4000:]

    clean = {k: v for k, v in pip_env().items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    where = subprocess.run([str(python), "-c", "import flux_mcp; print(flux_mcp.__file__)"], env=clean,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert Path(where.stdout.strip()).is_relative_to(venv), "the package must come from the new environment"
    for command in ("flux-mcp", "flux-image-mcp"):
        proc = subprocess.run([str(venv / "bin" / command), "--version"], env=clean, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"flux-mcp {version}", command


def test_pyproject_names_the_distribution_and_both_commands():
    project = pyproject()
    assert project["name"] == "flux-image-mcp"
    assert project["scripts"] == {"flux-mcp": "flux_mcp.cli:main", "flux-image-mcp": "flux_mcp.cli:main"}


def test_readme_install_lines_name_the_new_distribution():
    text = (ROOT / "README.md").read_text()
    for line in ("uvx flux-image-mcp", "pipx run flux-image-mcp", "pip install flux-image-mcp"):
        assert line in text
    assert not re.search(r"(uvx|pipx run|pipx install|pip install) flux-mcp\b", text), \
        "the PyPI name flux-mcp belongs to an unrelated project"


# --- the MCP Bundle (.mcpb) for Claude Desktop -----------------------------------------------------

@contextlib.contextmanager
def _locked(prefix: Path) -> Iterator[None]:
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / "mcpb.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install_mcpb(version: str) -> list[str]:
    """`node <cli.js>` of @anthropic-ai/mcpb@`version`, installed into .cache/npm/mcpb once per checkout."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("npm and node must be on PATH: they install and run the official mcpb CLI")
    package = MCPB_PREFIX / "node_modules" / "@anthropic-ai" / "mcpb"
    with _locked(MCPB_PREFIX):
        try:
            found = json.loads((package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            found = None
        if found != version:
            proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(MCPB_PREFIX),
                                   f"@anthropic-ai/mcpb@{version}"], capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"npm install failed ({proc.returncode}); the npm registry must be "
                                   f"reachable:\n{proc.stderr[-4000:]}")
    cli = package / "dist" / "cli" / "cli.js"
    if not cli.is_file():
        raise RuntimeError(f"{cli} is missing from the installed package")
    return [node, str(cli)]


@pytest.fixture(scope="session")
def mcpb_cli() -> list[str]:
    try:
        return _install_mcpb(build_script().MCPB_VERSION)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot install the mcpb CLI: {exc}", pytrace=False)


@pytest.mark.subprocess
def test_official_mcpb_validate_accepts_the_manifest(mcpb_cli):
    proc = subprocess.run([*mcpb_cli, "validate", str(ROOT / "mcpb" / "manifest.json")], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Manifest schema validation passes!" in proc.stdout


@pytest.mark.subprocess
def test_readme_build_command_packs_the_manifest_and_a_buildable_package(mcpb_cli, tmp_path):
    assert "python scripts/build_mcpb.py" in (ROOT / "README.md").read_text()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mcpb.py"),
                           "--out", str(tmp_path / "dist"), "--stage", str(tmp_path / "stage"),
                           "--mcpb", shlex.join(mcpb_cli)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = Path(proc.stdout.strip().splitlines()[-1])
    assert bundle == tmp_path / "dist" / f"flux-image-mcp-{pyproject()['version']}.mcpb" and bundle.is_file()

    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
        assert json.loads(zf.read("manifest.json")) == manifest()
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "src" / "flux_mcp").rglob("*.py")}
    assert {"manifest.json", "pyproject.toml", "README.md", "LICENSE", *sources} <= names
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "bench/", ".venv/"))]

    # What the uv runtime does with the bundle: build the project it contains, then run its command.
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                            str(tmp_path / "stage")], env=pip_env(), capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    [wheel] = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        scripts = zf.read(f"flux_image_mcp-{pyproject()['version']}.dist-info/entry_points.txt").decode()
    assert f"{manifest()['server']['mcp_config']['args'][3]} = flux_mcp.cli:main" in scripts


def test_manifest_asks_for_every_provider_key_as_optional_sensitive_config():
    data = manifest()
    assert data["manifest_version"] == "0.4" and data["server"]["type"] == "uv"
    assert data["version"] == pyproject()["version"]
    env = data["server"]["mcp_config"]["env"]
    config = data["user_config"]
    assert set(env) == secret_variables()
    for variable, value in env.items():
        key = re.fullmatch(r"\$\{user_config\.(\w+)\}", value)
        assert key, variable
        entry = config[key[1]]
        assert entry["type"] == "string" and entry["sensitive"] is True, variable
        assert entry["required"] is False, variable
        # The host leaves `${user_config.X}` as written when X has neither a value nor a default.
        assert entry["default"] == "", f"{variable}: an unset key would reach the server as that text"

    folders = config["allowed_dirs"]
    assert folders["type"] == "directory" and folders["multiple"] is True
    args = data["server"]["mcp_config"]["args"]
    # A list expands into separate arguments only in args (the host cannot join it into one variable).
    assert args[args.index("--allowed-dirs") + 1] == "${user_config.allowed_dirs}"
    assert args[:4] == ["run", "--directory", "${__dirname}", "flux-image-mcp"]
    assert args[3] in pyproject()["scripts"]
    assert (ROOT / data["server"]["entry_point"]).is_file()


@pytest.mark.anyio
async def test_manifest_lists_the_tools_the_server_serves(home, workspace):
    from flux_mcp.server import build_server

    settings = Settings.from_env({"FLUX_MCP_HOME": str(home)}, cwd=workspace)
    async with Client(build_server(settings)) as client:
        served = {tool.name for tool in (await client.list_tools()).tools}
    assert {tool["name"] for tool in manifest()["tools"]} == served


def host_substitute(value: Any, variables: dict[str, str | list[str]]) -> Any:
    """The host's variable substitution in mcp_config, as the MCPB spec states it: `${name}` in a string
    becomes a string value; an args item that is exactly `${user_config.X}` of a list expands into one
    argument per item; an unknown variable stays as written."""
    if isinstance(value, str):
        return re.sub(r"\$\{([^}]+)\}",
                      lambda m: v if isinstance(v := variables.get(m[1]), str) else m[0], value)
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            whole = re.fullmatch(r"\$\{(user_config\.[^}]+)\}", item) if isinstance(item, str) else None
            listed = variables.get(whole[1]) if whole else None
            out.extend(listed) if isinstance(listed, list) else out.append(host_substitute(item, variables))
        return out
    if isinstance(value, dict):
        return {k: host_substitute(v, variables) for k, v in value.items()}
    return value


@pytest.mark.anyio
@pytest.mark.subprocess
async def test_manifest_launch_line_serves_placeholders_into_the_chosen_folders(home, workspace, tmp_path):
    data = manifest()
    other = tmp_path / "site"
    other.mkdir()
    chosen: dict[str, Any] = {k: v["default"] for k, v in data["user_config"].items() if "default" in v}
    chosen["allowed_dirs"] = [str(workspace), str(other)]  # what the install dialog collected; no key given
    variables: dict[str, str | list[str]] = {"__dirname": str(ROOT), "/": os.sep, "pathSeparator": os.sep}
    variables |= {f"user_config.{k}": v if isinstance(v, list) else str(v) for k, v in chosen.items()}
    config = host_substitute(data["server"]["mcp_config"], variables)
    assert "${" not in json.dumps(config), config

    # `uv run --directory <bundle> flux-image-mcp ARGS`: the same command, installed beside this Python.
    command = shutil.which(config["args"][3], path=str(Path(sys.executable).parent))
    assert command
    env = child_env(home, **config["env"])
    # Claude Desktop starts servers in the home folder (child_env makes tmp_path the HOME).
    params = StdioServerParameters(command=command, args=config["args"][4:], env=env, cwd=str(tmp_path))
    with anyio.fail_after(60):
        async with Client(params) as client:
            small = {"width": 256, "height": 256}
            result = await client.call_tool("generate_image",
                                            {"prompt": "a hero", "save_to": "hero.png", **small})
            into_other = await client.call_tool(
                "generate_image", {"prompt": "a logo", "save_to": str(other / "logo.png"), **small})
    assert not result.is_error and not into_other.is_error
    assert result.structured_content and result.structured_content["provider"] == "placeholder"
    assert (workspace / "hero.png").is_file() and (other / "logo.png").is_file()


# --- the official MCP Registry: server.json --------------------------------------------------------

def registry_validator() -> jsonschema.Draft7Validator:
    raw = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256, "the vendored schema changed"
    checker = jsonschema.Draft7Validator.FORMAT_CHECKER
    assert {"uri", "uri-template"} <= set(checker.checkers), "jsonschema[format-nongpl] checks the formats"
    return jsonschema.Draft7Validator(json.loads(raw), format_checker=checker)


def test_server_json_validates_against_the_registry_schema():
    validator = registry_validator()
    data = server_json()
    assert data["$schema"] == validator.schema["$id"]
    assert [e.message for e in validator.iter_errors(data)] == []

    # The schema is really applied: fields and formats it requires are refused when wrong.
    wrong = ((("description",), "x" * 101), (("name",), "flux-image-mcp"), (("$schema",), "not a uri"),
             (("packages", 0, "transport"), {"type": "carrier-pigeon"}))
    for path, bad in wrong:
        broken = copy.deepcopy(data)
        target: Any = broken
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = bad
        assert list(validator.iter_errors(broken)), path


def test_server_json_names_the_pypi_package_over_stdio_and_marks_the_keys_secret():
    data = server_json()
    project = pyproject()
    [package] = data["packages"]
    assert package["registryType"] == "pypi" and package["identifier"] == project["name"] == "flux-image-mcp"
    assert package["registryBaseUrl"] == "https://pypi.org"  # the only PyPI base the official registry takes
    assert data["version"] == package["version"] == project["version"] == manifest()["version"]
    assert package["transport"] == {"type": "stdio"}

    variables = {v["name"]: v for v in package["environmentVariables"]}
    assert {n for n, v in variables.items() if v.get("isSecret")} == secret_variables()
    read_by_settings = inspect.getsource(Settings.from_env)
    for name, variable in variables.items():
        assert variable["isRequired"] is False, name
        if name not in secret_variables():
            assert f'"{name}"' in read_by_settings, f"{name} is not a variable flux-mcp reads"
    assert variables["FLUX_MCP_PROVIDER"]["choices"] == [cls.id for cls in PROVIDER_CLASSES]


def test_readme_carries_the_registry_ownership_marker_for_pypi():
    # The registry proves a PyPI package is the publisher's by finding `mcp-name: <server name>` in its
    # description, which PyPI takes from README.md.
    assert f"mcp-name: {server_json()['name']}" in (ROOT / "README.md").read_text()
    assert pyproject()["readme"] == "README.md"
