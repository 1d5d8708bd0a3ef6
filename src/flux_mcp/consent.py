"""Asking the user to confirm a call's cost (FLUX_MCP_CONFIRM_ABOVE_USD) through form elicitation.

Both protocol eras are served, and every way a question can end without a yes spends nothing:

* Handshake era (up to 2025-11-25): `ctx.elicit` sends `elicitation/create` in the middle of the call
  and waits at most `Question.timeout` seconds for the answer.
* 2026-07-28: a server sends no requests in the middle of a call. The tool returns an
  `InputRequiredResult` carrying the question (raised here as `InputNeeded`); the client asks the
  user and calls the tool again with the answer in `input_responses`, and with the `request_state`
  this module wrote: the question's digest and when it was asked (the SDK seals that state, so the
  client can neither read nor forge it). The second round runs the tool from the start, which is
  safe: the first round submitted nothing. An answer that comes after the timeout counts as none,
  and an answer to a different question (the estimate changed) asks again.

A client that declared no form elicitation is never asked: the answer is `unsupported`, and the
refusal tells the user which environment variable pre-authorises such calls.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from mcp.server.elicitation import render_elicitation_schema
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .money import Answer, Ask, Question

log = logging.getLogger("flux_mcp.consent")

KEY = "flux-mcp/confirm-cost"
"""The question's key in `input_requests` / `input_responses` (2026-07-28)."""
MODERN = "2026-07-28"


class Confirm(BaseModel):
    """Confirm that flux-mcp may pay for this image job."""

    model_config = ConfigDict(title="Confirm the cost")

    confirm: bool = Field(default=True, title="Pay for this job",
                          description="Leave checked and accept to pay; decline (or uncheck) to not pay.")


class InputNeeded(Exception):
    """The call must ask the client first (2026-07-28): the tool returns `result` and is called again."""

    def __init__(self, result: InputRequiredResult):
        super().__init__("input required")
        self.result = result


def can_elicit(ctx: Context[Any, Any]) -> bool:
    """Whether the client declared form elicitation (a bare `elicitation: {}` means form)."""
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def asker(ctx: Context[Any, Any], clock: Callable[[], float] = time.time) -> Ask:
    """The `ask` of one tool call: puts a `Question` to the user through this call's client."""

    async def ask(question: Question) -> Answer:
        if not can_elicit(ctx):
            return "unsupported"
        version = ctx.protocol_version
        if version is not None and is_version_at_least(version, MODERN):
            return _answered(ctx, question, clock)
        return await _elicit(ctx, question)

    return ask


async def _elicit(ctx: Context[Any, Any], question: Question) -> Answer:
    """Handshake era: ask in the middle of the call, wait at most the question's timeout."""
    with anyio.move_on_after(question.timeout):
        try:
            result = await ctx.elicit(question.message, Confirm)
        except (MCPError, ValueError) as exc:  # the client failed to ask, or answered outside the form
            log.info("confirmation not obtained: %s", exc)
            return "cancel"
        if result.action == "accept":
            return "accept" if result.data.confirm else "decline"
        return result.action
    return "timeout"


def _answered(ctx: Context[Any, Any], question: Question, clock: Callable[[], float]) -> Answer:
    """2026-07-28: the answer this round carries, or InputNeeded to ask for it."""
    state = _read_state(ctx.request_state)
    answer = (ctx.input_responses or {}).get(KEY)
    if answer is None or state.get("q") != question.digest:
        params = ElicitRequestFormParams(message=question.message,
                                         requested_schema=render_elicitation_schema(Confirm))
        raise InputNeeded(InputRequiredResult(
            input_requests={KEY: ElicitRequest(params=params)},
            request_state=json.dumps({"q": question.digest, "asked": clock()})))
    asked = state.get("asked")
    if not isinstance(asked, (int, float)) or clock() - asked > question.timeout:
        return "timeout"
    if not isinstance(answer, ElicitResult):
        return "cancel"
    if answer.action != "accept":
        return answer.action
    try:
        return "accept" if Confirm.model_validate(answer.content or {}).confirm else "decline"
    except ValidationError:
        return "cancel"


def _read_state(raw: str | None) -> dict[str, Any]:
    try:
        state = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}
