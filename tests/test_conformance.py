"""The official MCP conformance suite against `flux-mcp serve --transport streamable-http`, both spec eras.

Every scenario runs (`--suite all` at each spec version); the only failures allowed are the checks listed
in conformance-expected-failures.yaml, which need the suite's fixture server. The runner itself fails on
an unexpected failure or on a listed check that passes.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.npm_tools import NpmTools, npm_tools  # noqa: F401 - the session fixture
from tests.subprocess_helpers import child_env, http_server

pytestmark = pytest.mark.subprocess

SPEC_VERSIONS = ("2025-11-25", "2026-07-28")
EXPECTED_FAILURES = Path(__file__).with_name("conformance-expected-failures.yaml")
MUST_PASS = {
    "2025-11-25": {"server-initialize", "server-session-lifecycle", "logging-set-level", "ping", "tools-list",
                   "tools-call-error", "resources-list", "prompts-list", "server-sse-multiple-streams",
                   "dns-rebinding-protection"},
    "2026-07-28": {"tools-list", "tools-call-error", "resources-list", "sep-2164-resource-not-found",
                   "prompts-list", "server-sse-multiple-streams", "dns-rebinding-protection", "caching",
                   "http-header-validation"},
}
"""Scenarios that apply to any server: each must run and pass every check, with nothing excused."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Run:
    returncode: int
    output: str
    results: Path

    def checks(self) -> dict[str, list[dict]]:
        """Scenario name -> its checks, from the per-scenario `checks.json` files the runner saves."""
        out: dict[str, list[dict]] = {}
        for checks in self.results.glob("server-*/checks.json"):
            name = re.sub(r"-\d{4}-\d\d-\d\dT.*$", "", checks.parent.name.removeprefix("server-"))
            out[name] = json.loads(checks.read_text())
        return out

    def excused(self) -> set[str]:
        """The baseline entries this run reported as expected failures."""
        text = _ANSI.sub("", self.output)
        section = text.partition("Expected failures (in baseline):")[2]
        return set(re.findall(r"^\s+~ (\S+)$", section, re.MULTILINE))


@pytest.fixture(scope="module")
def runs(npm_tools: NpmTools,  # noqa: F811 - the imported fixture
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    root = tmp_path_factory.mktemp("conformance")
    workspace = root / "project"
    workspace.mkdir()
    out: dict[str, Run] = {}
    with http_server("streamable-http", child_env(root / "flux-home", FLUX_MCP_LOG_LEVEL="WARNING"),
                     workspace) as (url, _):
        for version in SPEC_VERSIONS:
            results = root / f"results-{version}"
            proc = subprocess.run(
                [str(npm_tools.node), str(npm_tools.conformance_cli), "server", "--url", f"{url}/mcp",
                 "--suite", "all", "--spec-version", version, "--expected-failures", str(EXPECTED_FAILURES),
                 "-o", str(results)],
                env=npm_tools.env(root / "node-home"), cwd=root, capture_output=True, text=True, timeout=600,
                stdin=subprocess.DEVNULL, check=False)
            out[version] = Run(proc.returncode, proc.stdout + proc.stderr, results)
    yield out


@pytest.mark.parametrize("version", SPEC_VERSIONS)
def test_conformance_suite_passes_but_for_fixture_scenarios(runs: dict[str, Run], version: str) -> None:
    run = runs[version]
    verdict = _ANSI.sub("", run.output).rpartition("Total: ")[2]  # the totals and the baseline verdict
    returncode = run.returncode
    assert returncode == 0, verdict[-6000:]
    checks = run.checks()
    for scenario in sorted(MUST_PASS[version]):
        assert scenario in checks, f"{scenario} did not run at {version}"
        failing = [c for c in checks[scenario] if c["status"] not in ("SUCCESS", "INFO")]
        assert not failing, f"{scenario} at {version}: {failing}"


def test_every_expected_failure_is_a_failure_some_run_saw(runs: dict[str, Run]) -> None:
    listed = set(re.findall(r"^\s*-\s+(\S+)\s*$", EXPECTED_FAILURES.read_text(), re.MULTILINE))
    assert listed, "no entries parsed from the expected-failures file"
    seen = set().union(*(run.excused() for run in runs.values()))
    assert listed == seen, f"never failing: {sorted(listed - seen)}; unlisted: {sorted(seen - listed)}"
