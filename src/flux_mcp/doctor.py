"""`flux-mcp doctor`: checks each configured provider's key and base URL without paying for a job.

Each provider gets one free request that its API authenticates before anything else:

* Atlas Cloud, Segmind, ImagePipeline: a status request (GET) for a job id that cannot exist. A refusal
  of the key (401/403) means the key is wrong; "no such job" (404, or 400) means the key was accepted.
* AceDataCloud: its task query (`POST /flux/tasks`, `action: retrieve`), which the provider documents as
  free, for a task id that cannot exist; an unknown id is answered 200 with an empty record.
* AppyPie: no free authenticated request is documented (its only endpoint runs the model), so the key
  cannot be checked without paying. Doctor sends the generate path a request *without* the key: the
  gateway refuses it before anything runs, which proves the base URL reaches the gateway.

No job-creating request with valid arguments is ever sent, and no key value is ever printed: every text
from a provider passes the redactor, and base URLs are shown without user information.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2

from .config import Settings
from .http import USER_AGENT, BodyTooLarge, LazyClient, ProviderHttp, error_code, read_capped
from .providers import registry
from .providers.registry import ProviderSpec
from .redact import Redactor

Verdict = Literal["OK", "KEY REFUSED", "UNREACHABLE", "NOT THE API", "UNKNOWN", "NOT CHECKED", "NOT CONFIGURED"]
PROBLEMS: frozenset[str] = frozenset({"KEY REFUSED", "UNREACHABLE", "NOT THE API", "UNKNOWN"})
"""The verdicts that make `doctor` exit 1. NOT CHECKED (no free way to test the key) and NOT CONFIGURED
are reported but are nothing to fix."""

DEADLINE = 10.0
"""Seconds for each probe, answer included: doctor answers fast rather than retrying."""
MAX_ANSWER_BYTES = 64 * 1024
"""A probe's answer is a short JSON error; anything larger is not the provider's API."""
NO_SUCH_JOB = "00000000-0000-0000-0000-000000000000"
"""A job id no provider hands out (the nil UUID)."""


@dataclass(frozen=True)
class Check:
    """The verdict on one provider."""

    provider: str
    label: str
    verdict: Verdict
    detail: str
    fix: str | None = None
    """The environment variable to look at, when something is to be fixed or set."""
    base_url: str | None = None

    @property
    def problem(self) -> bool:
        return self.verdict in PROBLEMS

    def as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "label": self.label, "configured": self.verdict != "NOT CONFIGURED",
                "verdict": self.verdict, "ok": not self.problem, "detail": self.detail, "fix": self.fix,
                "base_url": self.base_url}


@dataclass(frozen=True)
class Probe:
    """One free request, and how its answer is read."""

    method: str
    path: str
    headers: Mapping[str, str]
    accepted: frozenset[int]
    """Statuses (with a JSON body) that prove the key was accepted."""
    body: Any = None
    refused: frozenset[int] = frozenset({401, 403})
    refused_codes: frozenset[str] = frozenset()
    """Provider error codes that mean the key was refused whatever the status."""
    sends_key: bool = True
    """False: the key cannot be checked for free; the probe only shows the gateway answers (it must
    refuse the key-less request with a JSON `expected_refusal`)."""
    expected_refusal: frozenset[int] = field(default_factory=frozenset)


def _atlascloud(key: str) -> Probe:
    return Probe("GET", f"/api/v1/model/prediction/{NO_SUCH_JOB}",
                 {"Authorization": f"Bearer {key}", "Accept": "application/json"}, frozenset({400, 404}))


def _segmind(key: str) -> Probe:
    # The v2 status request of the async API; the credits endpoint is only named by a third party
    # (with no answer shape), so the status request is the one relied on.
    return Probe("GET", f"/v2/requests/{NO_SUCH_JOB}/status", {"x-api-key": key}, frozenset({400, 404, 422}))


def _acedatacloud(key: str) -> Probe:
    return Probe("POST", "/flux/tasks", {"authorization": f"Bearer {key}", "accept": "application/json"},
                 frozenset({200, 400, 404}), body={"id": NO_SUCH_JOB, "action": "retrieve"},
                 refused_codes=frozenset({"no_token", "invalid_token", "token_expired", "token_mismatched"}))


def _imagepipeline(key: str) -> Probe:
    return Probe("GET", f"/generate/v3/status/{NO_SUCH_JOB}",
                 {"API-Key": key, "X-API-Key": key, "Accept": "application/json"}, frozenset({400, 404, 422}))


def _appypie(key: str) -> Probe:
    del key  # never sent: AppyPie's only endpoint runs (and may bill) the model
    return Probe("POST", "/flux-1-schnell/v1/getData", {"Content-Type": "application/json",
                                                       "Accept": "application/json"},
                 frozenset(), body={}, sends_key=False, expected_refusal=frozenset({401}))


PROBES = {"atlascloud": _atlascloud, "segmind": _segmind, "acedatacloud": _acedatacloud,
          "imagepipeline": _imagepipeline, "appypie": _appypie}


async def diagnose(settings: Settings, client: httpx2.AsyncClient | None = None, *,
                   deadline: float = DEADLINE) -> list[Check]:
    """One `Check` per provider that takes a key, in registry order; the configured ones are probed at
    once, each with one request and no retry."""
    redactor = Redactor(settings.secrets())
    specs = registry.keyed()
    checks: dict[str, Check] = {}
    own = client is None
    http = client or httpx2.AsyncClient(timeout=httpx2.Timeout(deadline, connect=min(deadline, 5.0)),
                                        follow_redirects=False, trust_env=False)

    async def one(spec: ProviderSpec, key: str, base_url: str) -> None:
        checks[spec.id] = await _check(spec, key, base_url, http, redactor, deadline)

    try:
        async with anyio.create_task_group() as tg:
            for spec in specs:
                conf = settings.providers[spec.id]
                if conf.api_key is None or spec.id not in PROBES:
                    checks[spec.id] = Check(spec.id, spec.label, "NOT CONFIGURED",
                                            f"set {spec.key_env} to use {spec.label}", spec.key_env)
                else:
                    tg.start_soon(one, spec, conf.api_key.get_secret_value(), conf.base_url)
    finally:
        if own:
            await http.aclose()
    return [checks[s.id] for s in specs]


async def _check(spec: ProviderSpec, key: str, base_url: str, client: httpx2.AsyncClient, redactor: Redactor,
                 deadline: float) -> Check:
    probe = PROBES[spec.id](key)
    base = base_url.rstrip("/")
    shown = shown_url(base)
    base_env = spec.base_url_env

    def verdict(v: Verdict, detail: str, fix: str | None) -> Check:
        return Check(spec.id, spec.label, v, redactor.scrub(detail), fix, shown)

    try:
        with anyio.fail_after(deadline):
            request = client.build_request(probe.method, base + probe.path,
                                           headers={"User-Agent": USER_AGENT, **probe.headers},
                                           **({} if probe.body is None else {"json": probe.body}))
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                response._content = await read_capped(response, MAX_ANSWER_BYTES)
            finally:
                await response.aclose()
    except TimeoutError:
        return verdict("UNREACHABLE", f"no answer from {shown} within {deadline:g} s; check {base_env} and "
                                      "the network", base_env)
    except httpx2.TransportError as exc:
        return verdict("UNREACHABLE", f"could not reach {shown} ({type(exc).__name__}); check {base_env} and "
                                      "the network", base_env)
    except (BodyTooLarge, httpx2.DecodingError, httpx2.InvalidURL):
        return verdict("NOT THE API", f"{shown} answered with something other than {spec.label}'s API; "
                                      f"{base_env} looks wrong", base_env)
    return _classify(spec, probe, response, shown, verdict)


def _classify(spec: ProviderSpec, probe: Probe, response: httpx2.Response, shown: str,
              verdict: Callable[[Verdict, str, str | None], Check]) -> Check:
    status = response.status_code
    base_env, key_env = spec.base_url_env, spec.key_env
    if 300 <= status < 400:
        return verdict("NOT THE API", f"{shown} redirects (HTTP {status}); {base_env} looks wrong", base_env)
    if not _is_json(response):
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        return verdict("NOT THE API", f"{shown} answered HTTP {status} with {kind}, not {spec.label}'s JSON "
                                      f"API; {base_env} looks wrong", base_env)
    if not probe.sends_key:
        if status in probe.expected_refusal:
            return verdict("NOT CHECKED", f"the gateway at {shown} answers; the key itself cannot be checked "
                                          f"without paying ({spec.label} documents no free authenticated "
                                          "request)", None)
        return verdict("UNKNOWN", f"HTTP {status} to a request without the key: {_message(spec, response)}",
                       base_env)
    code = error_code(response)
    if status in probe.refused or (code is not None and code in probe.refused_codes):
        why = "refused" if status != 403 else "not allowed (no permission, or no balance left)"
        return verdict("KEY REFUSED", f"HTTP {status}{f' ({code})' if code else ''}: the key was {why}; "
                                      f"check {key_env}", key_env)
    if status in probe.accepted:
        return verdict("OK", f"key accepted (HTTP {status} to a status request for a job that does not exist)",
                       None)
    return verdict("UNKNOWN", f"HTTP {status}: {_message(spec, response)}", base_env if status == 404 else None)


def _is_json(response: httpx2.Response) -> bool:
    try:
        json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _message(spec: ProviderSpec, response: httpx2.Response) -> str:
    # message_of reads the provider's message field, truncated and scrubbed by the redactor given here.
    return ProviderHttp(LazyClient(), spec.id, Redactor()).message_of(response)


def shown_url(url: str) -> str:
    """`url` without user information (a password may sit there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def exit_code(checks: list[Check]) -> int:
    """0 when no provider has a problem to fix, else 1."""
    return 1 if any(c.problem for c in checks) else 0


def table(checks: list[Check]) -> str:
    """The human-readable report: one line per provider, then what to fix."""
    lines = [f"{'provider':<14} {'verdict':<15} detail"]
    lines += [f"{c.provider:<14} {c.verdict:<15} {c.detail}" for c in checks]
    fixes = [c for c in checks if c.problem and c.fix]
    if fixes:
        lines.append("")
        lines += [f"fix: {c.fix} ({c.provider}: {c.verdict.lower()})" for c in fixes]
    elif not any(c.verdict in ("OK", "NOT CHECKED") for c in checks):
        lines.append("\nno provider is configured; set one key variable to make real FLUX images")
    return "\n".join(lines)


async def run(settings: Settings, *, as_json: bool = False, client: httpx2.AsyncClient | None = None,
              deadline: float = DEADLINE) -> tuple[int, str]:
    """What `flux-mcp doctor [--json]` prints, and its exit code."""
    checks = await diagnose(settings, client, deadline=deadline)
    code = exit_code(checks)
    if as_json:
        return code, json.dumps({"ok": code == 0, "providers": [c.as_dict() for c in checks]}, indent=2)
    return code, table(checks)
