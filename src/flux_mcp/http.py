"""The provider HTTP layer: a never-repeated submit, safe retries, capped bodies, one error mapping.

Two kinds of request exist and they are kept apart on purpose:

* `submit` sends the request that creates a paid job. It is sent exactly once. A failure before
  the request left (connect error) is reported as "nothing was sent"; anything after that which
  gives no answer is `SubmitOutcomeUnknown`: the job may exist, and the server says so.
* `fetch` is a status poll or any other request that is safe to repeat. It is retried with
  backoff on network errors, 429 and 502/503/504, honouring the provider's wait hint up to a cap.

The pieces every request shares live here once, and image downloads (`media.Downloader`) use them too:

* `with_retries` — the one retry loop: an overall deadline per attempt, backoff with jitter, the
  server's wait hint honoured up to a cap.
* `read_capped` — the one body reader: streamed under a byte cap. Status answers are small JSON, so
  they get a low cap (`RetryPolicy.max_status_bytes`, 1 MiB); an answer over its cap is an error that is
  never asked again (a compressed bomb would otherwise be inflated once per attempt).
* `wait_hint` / `retry_after` — the one reading of "when may I ask again": `Retry-After` (seconds or an
  HTTP date), the reset moments some providers send instead, and the "try again in N seconds" that
  Azure API Management gateways write into their 429 bodies.
* `ProviderHttp.error_for` — the one answer->error mapping. Each adapter declares its documented
  error answers as a tuple of `ErrorRule`s; the rules here are the fallback every adapter shares.

Redirects are never followed on provider API calls, so a key header never reaches another origin.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

import anyio
import httpx2

from .errors import (
    AuthFailed,
    FluxError,
    InsufficientCredits,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    SubmitOutcomeUnknown,
)
from .redact import Redactor

log = logging.getLogger("flux_mcp.http")

USER_AGENT = "flux-mcp"
MAX_API_BYTES = 64 * 1024 * 1024
"""The largest answer to a submit (Segmind answers with the image itself, Atlas Cloud with base64 images)."""
MAX_STATUS_BYTES = 1024 * 1024
"""The largest status answer read by default: they are small JSON documents."""
HELD_REQUESTS = 128
"""At most this many submits are held open at once (synchronous modes); more jobs are polled instead."""
_NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.UnsupportedProtocol)

T = TypeVar("T")
Phase = Literal["submit", "poll", "upload"]
"""What the answer was to: the job-creating request, a status check (or other safe request), an upload."""


class LazyClient:
    """The process-wide HTTP client, created on first use: a server that only lists its tools starts
    without loading the TLS stack and CA bundle."""

    def __init__(self) -> None:
        self._client: httpx2.AsyncClient | None = None

    def get(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(30.0, connect=10.0),
                # Room for HELD_REQUESTS submits held open by synchronous modes plus the usual traffic;
                # few idle connections are kept (httpcore scans the pool on every request).
                limits=httpx2.Limits(max_connections=HELD_REQUESTS + 32, max_keepalive_connections=24),
                follow_redirects=False, trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def resolve(client: httpx2.AsyncClient | LazyClient) -> httpx2.AsyncClient:
    return client.get() if isinstance(client, LazyClient) else client


# --- the one retry loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How safe (GET-like) requests are retried, and how much of a status answer is read."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    deadline: float = 60.0
    """Overall seconds for one attempt, body included."""
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    max_status_bytes: int = MAX_STATUS_BYTES
    """The largest status answer read; a larger one is an error, and is not asked for again."""

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number `attempt + 1`: exponential, capped, with jitter."""
        delay = min(self.base_delay * 2.0**attempt, self.max_delay)
        return delay * (0.75 + random.random() / 2)


class Retryable(Exception):
    """Raised by an attempt that failed for a passing reason (a busy server, a name that did not resolve);
    `after` is the server's wait hint, when it gave one."""

    def __init__(self, reason: str, *, after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.after = after


class GaveUp(Exception):
    """Every attempt failed in a way worth retrying. `reason` describes the last failure, `kind` names it."""

    def __init__(self, attempts: int, reason: str, kind: str):
        super().__init__(f"after {attempts} tries: {reason}")
        self.attempts = attempts
        self.reason = reason
        self.kind = kind


async def with_retries(attempt: Callable[[bool], Awaitable[T]], policy: RetryPolicy, *,
                       label: str = "request", deadline: float | None = None) -> T:
    """Runs `attempt(final)` until it returns, at most `policy.attempts` times.

    Network errors, bodies that fail to decompress, timeouts (each attempt has `deadline`, default
    `policy.deadline`, seconds in all) and `Retryable` are retried; anything else propagates at once.
    `final` is true on the last try, so an attempt can return a retryable answer as it is instead of
    raising. Raises `GaveUp` at the end.
    """
    limit = deadline or policy.deadline
    reason, kind = "no attempt", "GaveUp"
    for number in range(policy.attempts):
        final = number == policy.attempts - 1
        after: float | None = None
        try:
            with anyio.fail_after(limit):
                return await attempt(final)
        except TimeoutError:
            reason, kind = f"no complete answer within {limit:g} s", "TimeoutError"
        except (httpx2.TransportError, httpx2.DecodingError) as exc:
            reason, kind = str(exc) or type(exc).__name__, type(exc).__name__
        except Retryable as exc:
            reason, kind, after = exc.reason, "Retryable", exc.after
        if final:
            break
        delay = min(policy.backoff(number) if after is None else after, policy.max_retry_after)
        log.info("%s: %s; retrying in %.1fs", label, reason, delay)
        await anyio.sleep(delay)
    raise GaveUp(policy.attempts, reason, kind)


# --- the one body reader --------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """An answer's body (after decompression) is over its cap. `declared` is its Content-Length, if any."""

    def __init__(self, limit: int, declared: int | None = None):
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit
        self.declared = declared


async def read_capped(response: httpx2.Response, limit: int) -> bytes:
    """The whole (decoded) body of a streamed answer, refusing it as soon as it passes `limit` bytes.

    A declared Content-Length over the cap is refused before reading anything. Decompression happens
    in bounded pieces as the body streams, so a small compressed bomb costs at most `limit` bytes.
    """
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class AnswerTooLarge(ProviderUnavailable):
    """A status answer was over its byte cap; it was not read further and not asked for again."""


# --- the one reading of a wait hint ---------------------------------------------------------------


@dataclass(frozen=True)
class WaitHint:
    """How long the provider asks for; `until` is its own reset moment, as written, when it gave one."""

    seconds: float
    until: str | None = None

    def when(self) -> str:
        """`in N seconds` (exact), or `in about N seconds` when computed from a reset moment."""
        if self.until is not None:
            return f"in about {max(1, math.ceil(self.seconds))} seconds"
        return f"in {self.seconds:g} seconds"


_SECONDS_IN_TEXT = re.compile(r"(?i)try again in (\d+(?:\.\d+)?) seconds?")
_RESET_AT = ("x-rate-limit-reset-at-utc",)
"""Headers holding the moment a limit resets (Segmind: ISO 8601; HTTP dates and epoch times also read)."""
_RESET_IN = ("ratelimit-reset", "x-ratelimit-reset")
"""Headers holding seconds until the reset, or (when large) the reset moment as epoch seconds."""


def wait_hint(response: httpx2.Response, *, now: float | None = None) -> WaitHint | None:
    """The provider's wait hint: `Retry-After` (seconds or an HTTP date), a reset-moment header, or a
    "try again in N seconds" in the body (what Azure API Management gateways write into a 429)."""
    clock = time.time() if now is None else now
    headers = response.headers
    raw = headers.get("retry-after", "").strip()
    if raw:
        number = _number(raw)
        seconds = number if number is not None else _until(raw, clock)
        if seconds is not None:
            return WaitHint(max(0.0, seconds))
    for name in _RESET_AT:
        raw = headers.get(name, "").strip()
        if raw and (seconds := _until(raw, clock)) is not None:
            return WaitHint(seconds, until=raw)
    for name in _RESET_IN:
        raw = headers.get(name, "").strip()
        number = _number(raw) if raw else None
        if number is not None:
            if number > 1e9:  # an epoch time, not a delay
                return WaitHint(max(0.0, _epoch(number) - clock), until=raw)
            return WaitHint(max(0.0, number))
    found = _SECONDS_IN_TEXT.search(response.content[:2000].decode("utf-8", "replace"))
    return WaitHint(float(found.group(1))) if found else None


def retry_after(response: httpx2.Response) -> float | None:
    """Seconds the provider asks us to wait before asking again, when it says."""
    hint = wait_hint(response)
    return hint.seconds if hint else None


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _epoch(number: float) -> float:
    return number / 1000 if number > 1e11 else number  # milliseconds, or seconds


def _until(raw: str, clock: float) -> float | None:
    """Seconds from `clock` until the moment `raw` names: epoch seconds or ms, ISO 8601, or an HTTP date."""
    number = _number(raw)
    if number is not None:
        return max(0.0, _epoch(number) - clock)
    when: dt.datetime | None = None
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - clock)


# --- declarative error rules ----------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorRule:
    """One documented error answer: when it matches, the error to raise and what its text says.

    Every condition given must hold: `status` (one HTTP status or a collection of them), `code` (the
    provider's own error code in the body, compared case-insensitively), `coded` (whether the body
    carries any error code at all), `pattern` (a regular expression searched, case-insensitively, in
    the body's error text) and `phase`.

    `text` is a template; the fields are `who` (the provider id), `status`, `detail` (the body's
    error text, short and scrubbed), `code`, `code_detail` (`CODE: detail`), `var` (the key variable),
    `var_in` (` in VAR`), `when` (`in N seconds`, or `in a minute` without a hint), `reset` (` (the limit
    resets at T)` when the provider named the moment), `then` (what the
    429 meant for the job: "the job was not created. Try again" or "the job keeps running. Call
    check_prediction"), `advice` (extra text the adapter passes) and any field the adapter passes.
    """

    error: type[FluxError]
    text: str
    status: int | Collection[int] | None = None
    code: str | Collection[str] | None = None
    coded: bool | None = None
    pattern: str | None = None
    phase: Phase | tuple[Phase, ...] | None = None

    def matches(self, status: int, code: str | None, detail: str, phase: Phase) -> bool:
        if self.status is not None and not (
                status == self.status if isinstance(self.status, int) else status in self.status):
            return False
        if self.code is not None:
            wanted = {self.code} if isinstance(self.code, str) else set(self.code)
            if code is None or code.lower() not in {c.lower() for c in wanted}:
                return False
        if self.coded is not None and self.coded != (code is not None):
            return False
        if self.pattern is not None and not re.search(self.pattern, detail, re.IGNORECASE):
            return False
        return self.phase is None or phase in ((self.phase,) if isinstance(self.phase, str) else self.phase)


SERVER_ERROR = range(500, 600)
CLIENT_ERROR = range(400, 500)

DEFAULT_RULES: tuple[ErrorRule, ...] = (
    ErrorRule(AuthFailed, "{who} refused the API key{var_in} (HTTP 401: {detail}). Check that the key is "
              "current and copied whole, then restart the server.", status=401),
    ErrorRule(InsufficientCredits, "{who} says the account has insufficient balance (HTTP 402: {detail}). "
              "Top up the account, or use another provider.", status=402),
    ErrorRule(AuthFailed, "{who} denied access (HTTP 403: {detail}). The key may lack permission for this "
              "model.", status=403),
    ErrorRule(RateLimited, "{who} is rate limiting requests (HTTP 429: {detail}); {then} {when}.",
              status=429),
    ErrorRule(ProviderUnavailable, "{who} answered with a redirect (HTTP {status}), which this server does "
              "not follow on API calls. Check the base URL setting.", status=range(300, 400)),
    ErrorRule(SubmitOutcomeUnknown, "{who} answered HTTP {status} ({detail}) to the submit request. The "
              "provider may or may not have started the job; this server did not resend it. Check the "
              "provider's dashboard before asking again, to avoid paying twice.",
              status=SERVER_ERROR, phase="submit"),
    ErrorRule(ProviderUnavailable, "{who} had a server error (HTTP {status}: {detail}). Try again later.",
              status=SERVER_ERROR),
    ErrorRule(ProviderRejected, "{who} rejected the request (HTTP {status}: {detail}).{advice}"),
)
"""What every adapter falls back to, after its own rules."""

_THEN: dict[Phase, str] = {
    "submit": "the job was not created. Try again",
    "poll": "the job keeps running. Call check_prediction",
    "upload": "nothing was uploaded. Try again",
}


# --- requests on behalf of one provider -----------------------------------------------------------


class ProviderHttp:
    """Requests on behalf of one provider, over the process-wide client."""

    def __init__(
        self,
        client: httpx2.AsyncClient | LazyClient,
        provider_id: str,
        redactor: Redactor,
        *,
        key_env: str | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.client = client
        self.provider_id = provider_id
        self.redactor = redactor
        self.key_env = key_env
        self.retry = retry or RetryPolicy()

    async def submit(self, method: str, url: str, *, held: float | None = None,
                     **kwargs: Any) -> httpx2.Response:
        """Sends a job-creating request once. Raises on any failure; never resends.

        `held`: the provider keeps this request open until the job is done (a synchronous mode), so
        its answer may take up to this many seconds instead of the usual deadline.
        """
        if held is not None:
            kwargs["timeout"] = httpx2.Timeout(held, connect=10.0)
        try:
            with anyio.fail_after(max(held or 0.0, self.retry.deadline)):
                return await self._send(method, url, max_bytes=MAX_API_BYTES, **kwargs)
        except _NOT_SENT as exc:
            raise ProviderUnavailable(
                f"Could not reach {self.provider_id} ({type(exc).__name__}); the request was not sent, "
                "so nothing was charged. Try again in a moment."
            ) from None
        except (httpx2.TransportError, httpx2.DecodingError, TimeoutError, BodyTooLarge) as exc:
            log.warning("%s submit got no answer: %s", self.provider_id, self.redactor.scrub(repr(exc)))
            raise SubmitOutcomeUnknown(
                f"The request to {self.provider_id} was sent but no answer came back ({type(exc).__name__}). "
                "The provider may have started the job and may charge for it; this server did not resend it. "
                "Check the provider's dashboard or history before asking again, to avoid paying twice."
            ) from None

    async def fetch(self, method: str, url: str, *, retry_statuses: frozenset[int] | None = None,
                    max_bytes: int | None = None, **kwargs: Any) -> httpx2.Response:
        """Sends a request that is safe to repeat, retrying transient failures.

        The answer is read up to `max_bytes` (default: the policy's status-answer cap); a larger one
        raises `AnswerTooLarge` at once, without another attempt.
        """
        statuses = self.retry.retry_statuses if retry_statuses is None else retry_statuses
        cap = max_bytes or self.retry.max_status_bytes

        async def attempt(final: bool) -> httpx2.Response:
            response = await self._send(method, url, max_bytes=cap, **kwargs)
            if response.status_code in statuses and not final:
                raise Retryable(f"{self.provider_id} answered HTTP {response.status_code}",
                                after=retry_after(response))
            return response

        try:
            return await with_retries(attempt, self.retry, label=self.provider_id)
        except BodyTooLarge:
            raise AnswerTooLarge(
                f"{self.provider_id}'s status answer was over {cap} bytes, far more than a status answer "
                "needs, so it was not read further and not asked for again. The job (if any) is kept; try "
                "check_prediction again later."
            ) from None
        except GaveUp as exc:
            raise ProviderUnavailable(
                f"{self.provider_id} did not answer ({exc.kind}) after {exc.attempts} tries. "
                "The job (if any) is kept; try check_prediction again later."
            ) from None

    async def _send(self, method: str, url: str, *, max_bytes: int, **kwargs: Any) -> httpx2.Response:
        headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
        client = resolve(self.client)
        request = client.build_request(method, url, headers=headers, **kwargs)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            body = await read_capped(response, max_bytes)
        finally:
            await response.aclose()
        response._content = body  # the body, read under our deadline and cap
        return response

    # --- turning answers into errors ----------------------------------------------------------

    def error_for(self, response: httpx2.Response, rules: Sequence[ErrorRule] = (), *, phase: Phase = "poll",
                  **fields: str) -> FluxError:
        """The one answer->error mapping: the first of `rules`, then of `DEFAULT_RULES`, that matches.

        `fields` fill the adapter's own template fields (and `advice`, appended to a plain rejection).
        """
        status = response.status_code
        detail = self.message_of(response)
        code = error_code(response)
        hint = wait_hint(response)
        values = {
            "who": self.provider_id, "status": str(status), "detail": detail, "code": code or "",
            "code_detail": f"{code}: {detail}" if code and code not in detail else detail,
            "var": self.key_env or "the API key variable",
            "var_in": f" in {self.key_env}" if self.key_env else "",
            "when": hint.when() if hint else "in a minute",
            "reset": f" (the limit resets at {hint.until})" if hint and hint.until else "",
            "then": _THEN[phase], "advice": "", **fields,
        }
        rule = next(r for r in (*rules, *DEFAULT_RULES) if r.matches(status, code, detail, phase))
        text = self.redactor.scrub(rule.text.format_map(values))
        if issubclass(rule.error, RateLimited):
            return rule.error(text, status_code=status, code=code, retry_after=hint.seconds if hint else None)
        if issubclass(rule.error, ProviderError):
            return rule.error(text, status_code=status, code=code)
        return rule.error(text)

    def message_of(self, response: httpx2.Response) -> str:
        """A short, scrubbed description of an error answer's body."""
        body = _json_of(response)
        text: str | None = None
        if isinstance(body, dict):
            text = _find_message(body)
        elif isinstance(body, str):
            text = body
        if text is None:
            raw = response.content[:2000].decode("utf-8", "replace").strip()
            ctype = response.headers.get("content-type", "")
            if "html" in ctype or raw.lower().startswith(("<!doctype", "<html")):
                text = "an HTML error page"
            elif raw:
                text = raw
            else:
                text = "empty answer"
        text = " ".join(str(text).split())
        if len(text) > 300:
            text = text[:297] + "..."
        return self.redactor.scrub(text)


def error_code(response: httpx2.Response) -> str | None:
    """The provider's own error code in an error body: `error_code`, or `error.code` in an envelope."""
    body = _json_of(response)
    if not isinstance(body, dict):
        return None
    for value in (body.get("error_code"), body["error"].get("code") if isinstance(body.get("error"), dict)
                  else None):
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def _json_of(response: httpx2.Response) -> object:
    """The body as JSON, or None when it is not JSON. Only error text is read this way; answers are
    read by each adapter's own models."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def _find_message(body: dict[str, object]) -> str | None:
    for key in ("message", "msg", "error", "detail", "error_message"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, dict):
            inner = _find_message(value)
            if inner:
                code = value.get("code")
                return f"{code}: {inner}" if isinstance(code, str) and code not in inner else inner
        if isinstance(value, list) and value:
            return "; ".join(_validation_item(v) for v in value[:3])
    data = body.get("data")
    if isinstance(data, dict):
        return _find_message(data)
    return None


def _validation_item(item: object) -> str:
    """One entry of a validation error list, e.g. `{"loc": ["body", "prompt"], "msg": "field required"}`
    as `prompt: field required`."""
    if not isinstance(item, dict):
        return str(item)
    msg = str(item.get("msg", item))
    loc = item.get("loc")
    where = ".".join(str(p) for p in loc if p != "body") if isinstance(loc, list) else ""
    return f"{where}: {msg}" if where else msg
