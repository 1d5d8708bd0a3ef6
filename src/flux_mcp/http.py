"""The provider HTTP layer: one status->error mapping, safe retries, and a never-repeated submit.

Two kinds of request exist and they are kept apart on purpose:

* `submit` sends the request that creates a paid job. It is sent exactly once. A failure before
  the request left (connect error) is reported as "nothing was sent"; anything after that which
  gives no answer is `SubmitOutcomeUnknown`: the job may exist, and the server says so.
* `fetch` is a status poll or any other request that is safe to repeat. It is retried with
  backoff on network errors, 429 and 502/503/504, honouring `Retry-After` up to a cap.

Redirects are never followed on provider API calls, so a key header never reaches another origin.
Every answer is read under an overall deadline with a byte cap, so a slow-drip or endless body
cannot hold a call forever.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx2

from .errors import (
    AuthFailed,
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
HELD_REQUESTS = 128
"""At most this many submits are held open at once (synchronous modes); more jobs are polled instead."""
_NOT_SENT = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.UnsupportedProtocol)


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


@dataclass(frozen=True)
class RetryPolicy:
    """How safe (GET-like) requests are retried."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    deadline: float = 60.0
    """Overall seconds for one attempt, body included."""
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})


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

    async def submit(self, method: str, url: str, *, held: float | None = None, **kwargs: Any) -> httpx2.Response:
        """Sends a job-creating request once. Raises on any failure; never resends.

        `held`: the provider keeps this request open until the job is done (a synchronous mode), so
        its answer may take up to this many seconds instead of the usual deadline.
        """
        if held is not None:
            kwargs["timeout"] = httpx2.Timeout(held, connect=10.0)
        try:
            return await self._send(method, url, deadline=held, **kwargs)
        except _NOT_SENT as exc:
            raise ProviderUnavailable(
                f"Could not reach {self.provider_id} ({type(exc).__name__}); the request was not sent, "
                "so nothing was charged. Try again in a moment."
            ) from None
        except (httpx2.TransportError, TimeoutError, _BodyTooLarge) as exc:
            log.warning("%s submit got no answer: %s", self.provider_id, self.redactor.scrub(repr(exc)))
            raise SubmitOutcomeUnknown(
                f"The request to {self.provider_id} was sent but no answer came back ({type(exc).__name__}). "
                "The provider may have started the job and may charge for it; this server did not resend it. "
                "Check the provider's dashboard or history before asking again, to avoid paying twice."
            ) from None

    async def fetch(self, method: str, url: str, *, retry_statuses: frozenset[int] | None = None,
                    **kwargs: Any) -> httpx2.Response:
        """Sends a request that is safe to repeat, retrying transient failures."""
        statuses = self.retry.retry_statuses if retry_statuses is None else retry_statuses
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            try:
                response = await self._send(method, url, **kwargs)
            except (httpx2.TransportError, TimeoutError, _BodyTooLarge) as exc:
                last = exc
                delay = self._backoff(attempt)
            else:
                if response.status_code not in statuses or attempt == self.retry.attempts - 1:
                    return response
                delay = min(
                    _retry_after(response) or self._backoff(attempt), self.retry.max_retry_after
                )
                last = None
                log.info("%s answered %s; retrying in %.1fs", self.provider_id, response.status_code, delay)
            await anyio.sleep(delay)
        assert last is not None
        raise ProviderUnavailable(
            f"{self.provider_id} did not answer ({type(last).__name__}) after {self.retry.attempts} tries. "
            "The job (if any) is kept; try check_prediction again later."
        ) from None

    def _backoff(self, attempt: int) -> float:
        delay = min(self.retry.base_delay * (2**attempt), self.retry.max_delay)
        return delay * (0.75 + random.random() / 2)

    async def _send(self, method: str, url: str, *, deadline: float | None = None, **kwargs: Any) -> httpx2.Response:
        headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
        client = resolve(self.client)
        request = client.build_request(method, url, headers=headers, **kwargs)
        with anyio.fail_after(max(deadline or 0.0, self.retry.deadline)):
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_API_BYTES:
                        raise _BodyTooLarge(f"answer over {MAX_API_BYTES} bytes")
                    chunks.append(chunk)
            finally:
                await response.aclose()
        response._content = b"".join(chunks)  # the body, read under our deadline and cap
        return response

    # --- turning answers into errors ----------------------------------------------------------

    def error_for(self, response: httpx2.Response, *, submit: bool = False) -> ProviderError | SubmitOutcomeUnknown:
        """The one status->error mapping. Adapters call it for answers they do not understand."""
        status = response.status_code
        detail = self.message_of(response)
        who = self.provider_id
        if status == 401:
            var = f" in {self.key_env}" if self.key_env else ""
            return AuthFailed(
                f"{who} refused the API key{var} (HTTP 401: {detail}). Check that the key is current and "
                "copied whole, then restart the server.",
                status_code=status,
            )
        if status == 402:
            return InsufficientCredits(
                f"{who} says the account has insufficient balance (HTTP 402: {detail}). Top up the account, "
                "or use another provider.",
                status_code=status,
            )
        if status == 403:
            return AuthFailed(
                f"{who} denied access (HTTP 403: {detail}). The key may lack permission for this model.",
                status_code=status,
            )
        if status == 429:
            retry_after = _retry_after(response)
            when = f"in {retry_after:g} seconds" if retry_after else "in a minute"
            return RateLimited(
                f"{who} is rate limiting requests (HTTP 429: {detail}); the job was not created. Try again {when}.",
                status_code=status,
                retry_after=retry_after,
            )
        if 300 <= status < 400:
            return ProviderUnavailable(
                f"{who} answered with a redirect (HTTP {status}), which this server does not follow on API "
                "calls. Check the base URL setting.",
                status_code=status,
            )
        if status >= 500 and submit:
            return SubmitOutcomeUnknown(
                f"{who} answered HTTP {status} ({detail}) to the submit request. The provider may or may not "
                "have started the job; this server did not resend it. Check the provider's dashboard before "
                "asking again, to avoid paying twice."
            )
        if status >= 500:
            return ProviderUnavailable(f"{who} had a server error (HTTP {status}: {detail}). Try again later.",
                                       status_code=status)
        return ProviderRejected(f"{who} rejected the request (HTTP {status}: {detail}).", status_code=status)

    def message_of(self, response: httpx2.Response) -> str:
        """A short, scrubbed description of an error answer's body."""
        body = parse_json(response)
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


class _BodyTooLarge(Exception):
    pass


def parse_json(response: httpx2.Response) -> Any:
    """The body as JSON, or None when it is not JSON."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def _find_message(body: dict[str, Any]) -> str | None:
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
            return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value[:3])
    data = body.get("data")
    if isinstance(data, dict):
        return _find_message(data)
    return None


def _retry_after(response: httpx2.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        import datetime as dt

        when = parsedate_to_datetime(raw)
        return max(0.0, (when - dt.datetime.now(when.tzinfo)).total_seconds())
    except (TypeError, ValueError):
        return None
