"""The journal as history: what `list_predictions`, `flux://history`, `flux-mcp history` and the gallery show.

One query (`page`) serves them all: the journal's newest-first search, one page at a time, with an
opaque cursor for the next page. `since` is read by one parser (`parse_since`) wherever it is typed:
ISO dates and times, `today`/`yesterday`, and relative spans such as `2d`, `3h`, `90 minutes`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, NotRequired

from typing_extensions import TypedDict

from .errors import InvalidInput
from .journal import Journal, Record
from .models import PENDING

MAX_LIMIT = 100
"""The most rows one page holds."""
MAX_QUERY = 400
"""Characters of a prompt query: a few words, each a condition of the search."""
PROMPT_START = 80
"""Characters of the prompt a compact row keeps."""
STATUSES = ("pending", "succeeded", "failed", "canceled", "starting", "processing", "unknown")
"""What a status filter accepts: "pending" is starting or processing."""

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hr": 3600, "hour": 3600,
          "d": 86_400, "day": 86_400, "w": 604_800, "week": 604_800}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+?)s?(?:\s+ago)?$")
SINCE_HELP = "e.g. 2d, 3h, 30m, 1w, today, yesterday, 2025-06-01 or 2025-06-01T14:00"


def parse_since(text: str, now: float | None = None) -> float:
    """The moment (epoch seconds) `text` names: an ISO date or date-time (local time unless it carries an
    offset), `today`, `yesterday`, `now`, or a span back from now (`2d`, `3 hours`, `90m ago`, `1w`)."""
    raw = text.strip().lower()
    now = time.time() if now is None else now
    midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if raw == "now":
        return now
    if raw == "today":
        return midnight.timestamp()
    if raw == "yesterday":
        return (midnight - timedelta(days=1)).timestamp()
    match = _RELATIVE.match(raw)
    if match and match.group(2) in _UNITS:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            return datetime.combine(date.fromisoformat(raw), datetime.min.time()).timestamp()
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise InvalidInput(f"since={text!r} is not a date or a span back from now ({SINCE_HELP}).") from None


def check_status(status: str | None) -> str | None:
    """`status` as the journal filters it (None: any); an unknown status is an error that lists the choices."""
    if not status:
        return None
    value = status.strip().lower()
    if value not in STATUSES:
        raise InvalidInput(f"status={status!r} is not one of {', '.join(STATUSES)}.")
    return value


# --- pages -------------------------------------------------------------------------------------------

def encode_cursor(record: Record) -> str:
    """An opaque token naming the place after `record` in a newest-first listing."""
    raw = json.dumps([record.created_at, record.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, rid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(created, int | float) and isinstance(rid, str):
            return float(created), rid
    except (binascii.Error, ValueError, TypeError):
        pass
    raise InvalidInput(f"before={cursor!r} is not a cursor this server returned; start again without it.")


@dataclass
class Page:
    """One page of history, newest first; `next` is the cursor of the following page (None: the last)."""

    records: list[Record]
    next: str | None


async def page(journal: Journal, *, principal: str | None, query: str | None = None, provider: str | None = None,
               status: str | None = None, since: float | None = None, limit: int = 20,
               before: str | None = None) -> Page:
    """Up to `limit` records matching the filters, newest first, after the cursor `before`."""
    limit = max(1, min(limit, MAX_LIMIT))
    if query and len(query) > MAX_QUERY:
        raise InvalidInput(f"query is {len(query)} characters; use a few words of the prompt (at most {MAX_QUERY}).")
    found = await journal.search(principal=principal, query=query or None, provider=provider or None,
                                 status=check_status(status), since=since, limit=limit + 1,
                                 before=decode_cursor(before) if before else None)
    more = len(found) > limit
    records = found[:limit]
    return Page(records, encode_cursor(records[-1]) if more and records else None)


# --- rows ----------------------------------------------------------------------------------------------

def when(timestamp: float) -> str:
    """Local time to the minute, with its UTC offset: unambiguous for the model, short for the person."""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="minutes")


def prompt_of(record: Record) -> str:
    return str(record.request.get("prompt") or "")


def prompt_start(record: Record, length: int = PROMPT_START) -> str:
    text = " ".join(prompt_of(record).split())
    return text if len(text) <= length else text[: length - 1].rstrip() + "…"


def compact(record: Record) -> Row:
    """A row for the model: id, when, prompt start, status, the first image's path, cost (where known)."""
    row: Row = {"id": record.id, "when": when(record.created_at), "prompt": prompt_start(record),
                           "status": record.status}
    paths = [i.path for i in record.images if i.path]
    if paths:
        row["path"] = paths[0]
        if len(paths) > 1:
            row["images"] = len(paths)
    if record.cost_usd is not None:
        row["cost_usd"] = record.cost_usd
    if record.error and record.status in ("failed", "canceled"):
        row["error"] = record.error[:160]
    return row


def full(record: Record) -> dict[str, Any]:
    """A row for the person (gallery, `history --json`): everything a card and its detail view show."""
    req = record.request
    return {
        "id": record.id, "provider": record.provider, "model": record.model, "kind": record.kind,
        "status": record.status, "pending": record.status in PENDING, "prompt": prompt_of(record),
        "created_at": record.created_at, "completed_at": record.completed_at, "when": when(record.created_at),
        "width": req.get("width"), "height": req.get("height"), "seed": req.get("seed"),
        "num_images": req.get("num_images"), "cost_usd": record.cost_usd,
        "cost_estimated": getattr(record, "cost_estimated", None), "error": record.error,
        "images": [i.model_dump(mode="json") for i in record.images],
    }


class Row(TypedDict):
    """One earlier job; keys without a value are left out."""

    id: str
    when: str
    prompt: str
    status: str
    path: NotRequired[str]
    images: NotRequired[int]
    cost_usd: NotRequired[float]
    error: NotRequired[str]


class Listing(TypedDict):
    """The structured result of list_predictions: `Row`s (declared as plain objects, so that the schema every
    conversation reads in `tools/list` stays small) and whether older ones match too."""

    predictions: list[dict[str, Any]]
    more: bool


def model_text(records: list[Record], more: bool) -> str:
    """The text of a `list_predictions` result: one line per job, the paging hint last."""
    if not records:
        return "No predictions match. Try fewer filters, or a longer `since`."
    lines = []
    for rec in records:
        row = compact(rec)
        cost = f" ${rec.cost_usd:.4f}" if rec.cost_usd else ""
        where = f" {row['path']}" + (f" (+{row['images'] - 1} more)" if row.get("images") else "") \
            if "path" in row else ""
        why = f" — {row['error']}" if "error" in row else ""
        lines.append(f"{rec.id} {row['when']} {rec.status}{cost} \"{row['prompt']}\"{where}{why}")
    if more:
        lines.append("More, older predictions match: narrow with query/since, or raise limit.")
    lines.append("check_prediction(prediction_id) gives any job's full result.")
    return "\n".join(lines)


def table(records: list[Record], width: int = 120) -> str:
    """A terminal table, newest first: when, status, provider, cost, prompt, path."""
    if not records:
        return "No predictions match."
    rows = [(datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M"), r.status, r.provider,
             f"${r.cost_usd:.4f}" if r.cost_usd is not None else "-", " ".join(prompt_of(r).split()),
             next((i.path for i in r.images if i.path), "") or (r.error or "")[:60]) for r in records]
    head = ("when", "status", "provider", "cost", "prompt", "path")
    fixed = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head[:4])]
    room = max(width - sum(fixed) - 2 * 5, 40)
    prompt_w = max(16, min(48, room // 2, max(len(r[4]) for r in rows)))
    out = []
    for row in [head, *rows]:
        prompt = row[4] if len(row[4]) <= prompt_w else row[4][: prompt_w - 1] + "…"
        cells = [c.ljust(w) for c, w in zip(row[:4], fixed, strict=True)] + [prompt.ljust(prompt_w), row[5]]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
