"""The terminal commands, run as a new user would."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.subprocess_helpers import child_env, flux_command

pytestmark = pytest.mark.subprocess


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(flux_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generate_with_no_key_leaves_a_real_placeholder_image(home, workspace):
    proc = run(["generate", "a cozy cabin in the woods", "--width", "640", "--height", "384", "-o",
                "assets/cabin.png"], child_env(home), workspace)
    assert proc.returncode == 0, proc.stderr
    target = workspace / "assets" / "cabin.png"
    assert proc.stdout.strip() == str(target)
    with Image.open(target) as im:
        assert im.size == (640, 384) and im.format == "PNG"
        assert im.info["provider"] == "placeholder" and im.info["prompt"] == "a cozy cabin in the woods"
    assert "PLACEHOLDER" in proc.stderr and "ATLASCLOUD_API_KEY" in proc.stderr


def test_generate_json_prints_the_structured_result(home, workspace):
    proc = run(["generate", "x", "-n", "2", "--seed", "5", "--json"], child_env(home), workspace)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "succeeded" and len(data["images"]) == 2
    assert all(Path(i["path"]).is_file() for i in data["images"])


def test_generate_bad_argument_fails_with_a_clear_message(home, workspace):
    proc = run(["generate", "x", "--provider", "placeholder", "--width", "5"], child_env(home), workspace)
    assert proc.returncode == 1 and "width" in proc.stderr


def test_providers_lists_every_provider_and_what_to_set(home, workspace):
    proc = run(["providers"], child_env(home, SEGMIND_API_KEY="seg-canary-0123456789abcdef"), workspace)
    assert proc.returncode == 0, proc.stderr
    for pid in ("atlascloud", "segmind", "acedatacloud", "imagepipeline", "appypie", "placeholder"):
        assert pid in proc.stdout
    assert "set ATLASCLOUD_API_KEY" in proc.stdout and "configured (default)" in proc.stdout
    assert "seg-canary" not in proc.stdout + proc.stderr


def test_providers_json_marks_the_default(home, workspace):
    proc = run(["providers", "--json"], child_env(home), workspace)
    data = json.loads(proc.stdout)
    assert data["default"] == "placeholder"
    assert {p["id"]: p["configured"] for p in data["providers"]}["atlascloud"] is False


def test_version_and_bad_settings(home, workspace):
    assert run(["--version"], child_env(home), workspace).stdout.startswith("flux-mcp ")
    bad = run(["providers"], child_env(home, FLUX_MCP_WAIT_SECONDS="soon"), workspace)
    assert bad.returncode == 2 and "FLUX_MCP_WAIT_SECONDS must be a number" in bad.stderr


def test_generate_shows_progress_lines_while_it_waits(home, workspace):
    from tests.conftest import ATLAS_KEY
    from tests.fakes.atlascloud import AtlasFake
    from tests.fakes.wire import serve_on_loopback

    fake = AtlasFake(key=ATLAS_KEY, duration=6.0)
    with serve_on_loopback(fake) as url:
        proc = run(["generate", "a slow job", "-o", "slow.png"],
                   child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=url), workspace)
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if re.match(r"^\d+s atlascloud: (starting|processing)", ln)]
    assert len(progress) >= 1
    assert proc.stdout.strip() == str(workspace / "slow.png")


def test_opentelemetry_spans_only_when_opentelemetry_is_configured(tmp_path):
    from flux_mcp.config import Settings
    from flux_mcp.server import build_server

    def middleware(env: dict[str, str]) -> list[str]:
        settings = Settings.from_env({"FLUX_MCP_HOME": str(tmp_path), **env}, cwd=tmp_path)
        return [type(m).__name__ for m in build_server(settings).middleware]

    assert "OpenTelemetryMiddleware" not in middleware({})
    assert "OpenTelemetryMiddleware" in middleware({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert "OpenTelemetryMiddleware" not in middleware({"OTEL_SERVICE_NAME": "x", "OTEL_SDK_DISABLED": "true"})


# --- `-o PATH` is taken as typed: the folder rules are for the model, not the person at the terminal ---

def test_generate_in_the_home_folder_writes_o_into_the_current_directory(home, tmp_path):
    # child_env makes tmp_path the HOME; the tools never treat a home folder as a workspace.
    proc = run(["generate", "a lighthouse at dusk", "--width", "256", "--height", "256",
                "-o", "lighthouse.png"], child_env(home), tmp_path)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "lighthouse.png"
    assert proc.stdout.strip() == str(target)
    with Image.open(target) as im:
        assert im.size == (256, 256) and im.info["prompt"] == "a lighthouse at dusk"
    assert not list(home.rglob("lighthouse*.png")), "the copy belongs in the current directory only"

    again = run(["generate", "another", "--width", "256", "--height", "256", "-o", "lighthouse.png"],
                child_env(home), tmp_path)
    assert again.returncode != 0 and "already exists" in again.stderr
    with Image.open(target) as im:
        assert im.info["prompt"] == "a lighthouse at dusk"


def test_generate_writes_an_absolute_or_dotdot_o_outside_the_working_directory(home, workspace, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "new" / "cabin.webp"
    proc = run(["generate", "a cabin", "--width", "256", "--height", "256", "-o", str(elsewhere)],
               child_env(home), workspace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(elsewhere)
    with Image.open(elsewhere) as im:
        assert im.format == "WEBP"

    folder = run(["generate", "two cabins", "-n", "2", "--width", "256", "--height", "256",
                  "-o", "../shots/"], child_env(home), workspace)
    assert folder.returncode == 0, folder.stderr
    written = [Path(line) for line in folder.stdout.split()]
    assert len(written) == 2 and all(p.parent == tmp_path / "shots" and p.is_file() for p in written)


def test_sse_transport_is_marked_deprecated_in_help_and_readme(home, workspace):
    proc = run(["serve", "--help"], child_env(home), workspace)
    assert proc.returncode == 0, proc.stderr
    help_text = " ".join(proc.stdout.split())
    assert "sse (endpoint /sse) is deprecated" in help_text and "streamable-http" in help_text
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "`--transport sse` (the HTTP+SSE transport, endpoint `/sse`) is **deprecated**" in readme
