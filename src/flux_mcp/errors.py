"""The exceptions flux-mcp raises, and when to catch each.

    FluxError                      anything the model or user can act on; its text says what to do next
     +-- ConfigError               a missing key or bad setting (names the variable to set)
     +-- InvalidInput              an argument out of range or malformed (names the field and allowed values)
     +-- PathNotAllowed            a file path outside the allowed folders, or not a regular file
     +-- UnknownPrediction         check_prediction on an id this server never returned
     +-- UnsupportedOperation      the provider cannot do this (names the providers that can)
     +-- SpendRefused              a budget, max_cost_usd or the user refused the cost (nothing was sent)
     +-- ProviderError             the provider answered with an error
     |    +-- AuthFailed           401/403: the key is wrong, expired or lacks permission
     |    +-- InsufficientCredits  402/406/used_up: top up the account
     |    +-- RateLimited          429: wait `retry_after` seconds
     |    +-- ProviderRejected     4xx on the request itself: fix the arguments
     |    +-- ProviderUnavailable  5xx, network failure or unreadable answer on a safe (GET) call
     +-- SubmitOutcomeUnknown      the job may or may not have been created (never resend blindly)
     +-- DownloadFailed            a finished image could not be fetched or is not an image

Every message is written for the model reading a tool result. No message ever contains an
API key; `flux_mcp.redact` scrubs provider text before it is put into one.
"""

from __future__ import annotations

from mcp_types import CallToolResult, TextContent


class FluxError(Exception):
    """Base class: a failure whose message tells the caller what to do next."""


class ConfigError(FluxError):
    """A setting is missing or invalid."""


class InvalidInput(FluxError):
    """An argument is out of range or malformed; nothing was sent to any provider."""


class PathNotAllowed(FluxError):
    """A local path is outside the allowed folders or is not a regular file."""


class UnknownPrediction(FluxError):
    """No prediction with this id was ever returned by this server."""


class UnsupportedOperation(FluxError):
    """The chosen provider cannot do what was asked."""


class SpendRefused(FluxError):
    """The call was not paid for: over a budget or max_cost_usd, or the user did not confirm its cost."""


class ProviderError(FluxError):
    """The provider answered with an error.

    `status_code` is the HTTP status (None for network failures), `code` the provider's own error
    code when it gave one.
    """

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class AuthFailed(ProviderError):
    """The provider refused the key (401) or the key lacks permission (403)."""


class InsufficientCredits(ProviderError):
    """The account has no balance or credit left."""


class RateLimited(ProviderError):
    """Too many requests; `retry_after` seconds is the provider's hint when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object):
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ProviderRejected(ProviderError):
    """The provider rejected the request's content (bad parameter, unknown model, blocked prompt)."""


class ProviderUnavailable(ProviderError):
    """A server error, network failure or unreadable answer on a call that is safe to repeat."""


class SubmitOutcomeUnknown(FluxError):
    """The submit request may have created a paid job, but no answer proves it either way."""


class DownloadFailed(FluxError):
    """A finished image could not be downloaded, or what came back is not an image."""


def error_result(message: str) -> CallToolResult:
    """A tool error the model reads and can act on (`isError: true`, the message as its text)."""
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
