"""What every provider fake shares: the key check, the request log, the ledger of paid jobs, injected answers.

A fake subclasses `FakeBase` (a dataclass whose fields are keyword-only, so a subclass may declare its
own required fields such as `key`), names the header(s) its provider reads the key from, and writes
that provider's own answers to a missing or wrong key (`unauthorized_answer`) and to a key that may not do
what it asked (`forbidden_answer`). The fake's `handle` then calls, in its own order:

* `log(request)` first: every request, file downloads included, lands in `requests` as "METHOD /path";
* `check_key(request)`: None when the key is right, else the provider's refusal to answer with;
* `take(queue, request)` where a paid request (`submit_errors`) or a status request (`poll_errors`)
  is about to run: an injected answer to send instead, or None to run it;
* `ledger.append(body)` for every job the provider accepted (what a user would pay for).

Injected answers: each entry of `submit_errors` / `poll_errors` is consumed by one request and is
* `(status, body, headers)`: answered instead of running the request (a str body is sent as text,
  anything else as JSON);
* `None`: run the request normally (so that a later call is the one that fails: `[None, answer]`);
* `RESET`: the request arrives, but the connection is reset before any answer (`httpx2.ReadError`).

Echo mode (`echo_key = True`) makes the fake a careless provider that repeats the key it was given:
in its refusals of a key, in every injected answer's message fields, in failure reasons
(`echoed(text)`) and in the URLs of results (`file_url(...)`). Tests use it to prove that the
server never passes a key on. `revoke()` makes the provider refuse the key from then on, as if it
had been rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx2

Injected = tuple[int, Any, dict[str, str]]
"""An answer to send instead of running a request: (status, body, headers)."""

_MESSAGE_FIELDS = ("message", "msg", "error", "detail")


class Reset:
    """A queue entry: the request arrives, then the connection is reset before any answer."""

    def __repr__(self) -> str:
        return "RESET"


RESET = Reset()

Entry = Injected | Reset | None


@dataclass(kw_only=True)
class FakeBase:
    """The parts of a provider fake that do not depend on the provider's wire format."""

    key_headers: ClassVar[tuple[str, ...]] = ()
    """The request headers the provider reads the key from; any one of them may carry it."""
    key_scheme: ClassVar[str] = ""
    """What precedes the key in that header (e.g. "Bearer ")."""

    requests: list[str] = field(default_factory=list)
    """Every request received, as "METHOD /path", in order."""
    ledger: list[dict[str, Any]] = field(default_factory=list)
    """Every job the provider accepted: what a user would pay for."""
    submit_errors: list[Entry] = field(default_factory=list)
    """Consumed one per paid (job-creating) request; see the module docstring."""
    poll_errors: list[Entry] = field(default_factory=list)
    """Consumed one per status request; see the module docstring."""
    echo_key: bool = False
    """Repeat the presented key in refusals, injected answers, failure reasons and result URLs."""
    revoked: bool = False
    """Refuse every key, the right one too (the key was rotated on the provider's side)."""
    presented: str | None = field(default=None, init=False, repr=False)
    """The key the request being answered carried (None: it carried none)."""

    # --- what a subclass provides ------------------------------------------------------------------

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        """Answers one request as the provider would (the `tests.fakes.wire.Fake` protocol)."""
        raise NotImplementedError

    @property
    def expected_key(self) -> str:
        """The key this fake accepts."""
        raise NotImplementedError

    def unauthorized_answer(self, presented: str | None) -> Injected:
        """The provider's documented answer to a missing (None) or wrong key."""
        raise NotImplementedError

    def forbidden_answer(self) -> Injected:
        """The provider's documented answer to a valid key that may not do what was asked (HTTP 403)."""
        raise NotImplementedError

    # --- the shared steps ---------------------------------------------------------------------------

    def log(self, request: httpx2.Request) -> str:
        """Records the request; returns its path."""
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        return path

    def count(self, line: str) -> int:
        """How many requests started with `line` (e.g. "POST /v1/")."""
        return sum(1 for r in self.requests if r.startswith(line))

    def revoke(self) -> None:
        """From now on the provider refuses the key, as after a rotation."""
        self.revoked = True

    def check_key(self, request: httpx2.Request) -> httpx2.Response | None:
        """None when the request carries the accepted key; else the provider's refusal."""
        given = [v for v in (request.headers.get(h) for h in self.key_headers) if v]
        accepted = self.key_scheme + self.expected_key
        if not self.revoked and accepted in given:
            self.presented = self.expected_key
            return None
        self.presented = given[0].removeprefix(self.key_scheme) if given else None
        return self.reply(*self.unauthorized_answer(self.presented))

    def take(self, queue: list[Entry], request: httpx2.Request) -> httpx2.Response | None:
        """The next injected answer of `queue`, or None when none is queued (or the entry says: run it)."""
        if not queue:
            return None
        entry = queue.pop(0)
        if entry is None:
            return None
        if isinstance(entry, Reset):
            raise httpx2.ReadError("connection reset by peer", request=request)
        return self.reply(*entry)

    def reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> httpx2.Response:
        """An answer; in echo mode its message fields repeat the presented key."""
        if self.echo_key and self.presented:
            body = _with_key(body, self.presented, add=status >= 400)
        if isinstance(body, str):
            return httpx2.Response(status, text=body, headers=headers)
        return httpx2.Response(status, json=body, headers=headers)

    def echoed(self, text: str) -> str:
        """A failure reason as the provider words it; in echo mode it repeats the presented key."""
        return f"{text} (key {self.presented})" if self.echo_key and self.presented else text

    def file_url(self, request: httpx2.Request, name: str, folder: str = "files") -> str:
        """The URL of a result file on the fake's own host; in echo mode it carries the key in its query."""
        url = f"{request.url.scheme}://{request.url.netloc.decode()}/{folder}/{name}"
        return f"{url}?key={self.presented}" if self.echo_key and self.presented else url


def _with_key(body: Any, key: str, *, add: bool) -> Any:
    """`body` with the key appended to its message fields (`add`: also when it has none)."""
    if isinstance(body, str):
        return f"{body} (key {key})"
    if isinstance(body, list):
        return [_with_key(item, key, add=False) if isinstance(item, dict) else item for item in body]
    if not isinstance(body, dict):
        return body
    out = dict(body)
    changed = False
    for name in _MESSAGE_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = f"{value} (key {key})"
            changed = True
        elif isinstance(value, (dict, list)):
            out[name] = _with_key(value, key, add=False)
            changed = True
    if add and not changed:
        out["message"] = f"key {key}"
    return out


__all__ = ["RESET", "Entry", "FakeBase", "Injected", "Reset"]
