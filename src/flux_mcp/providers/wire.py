"""What every adapter needs to read a provider's answers: private models, and outputs made usable.

Each adapter describes the answers it reads as private `WireModel`s (unknown fields are kept, every
documented spelling of a field is an alias) and validates an answer once with `read`. Fields that
only carry metadata are `Loose`: a value of the wrong type becomes None instead of making the whole
answer unreadable, so a junk `price` never costs the user a finished image.

`resolve_outputs` turns the strings a provider gives as results into `OutputRef`s: absolute http(s)
URLs as they are, a path on the provider's own host (`/files/x.png`) resolved against its base URL,
and inline data where the provider documents it. Anything else (`file:`, `s3:`, `//host/x.png`, ...)
is reported as unusable, so the job can end with a clear reason instead of being polled forever.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx2
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from .base import JobState, OutputRef

T = TypeVar("T")
M = TypeVar("M", bound="WireModel")


class WireModel(BaseModel):
    """Base of the adapters' private answer models: unknown fields allowed, aliases or names accepted."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, defer_build=True)


def _or_none(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    try:
        return handler(value)
    except ValidationError:
        return None


Loose = Annotated[T | None, WrapValidator(_or_none)]
"""A field whose ill-typed value reads as None (metadata: prices, counters, messages)."""


def _text(value: object) -> object:
    return value.strip() or None if isinstance(value, str) else value


Text = Annotated[Loose[str], BeforeValidator(_text)]
"""A non-blank string, stripped; anything else reads as None."""


def first_string(*keys: str) -> Callable[[object], object]:
    """A before-validator for one output item: a string as is, or the first string among `keys` of an
    object; anything else becomes None (an item that is skipped)."""

    def pick(value: object) -> object:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return next((value[k] for k in keys if isinstance(value.get(k), str)), None)
        return None

    return pick


def read(model: type[M], response: httpx2.Response) -> M | None:
    """The answer validated once as `model`; None when it is not JSON of that shape."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError:
        return None


# --- outputs ------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_DATA_URI = re.compile(r"^data:([a-z0-9.+-]+/[a-z0-9.+-]+)?((?:;[a-z0-9=.-]+)*);base64,(.*)$",
                       re.IGNORECASE | re.DOTALL)
_RELATIVE = re.compile(r"^[\w.~%+-]+(/[\w.~%+=-]*)+(\?\S*)?$")
"""A relative path with at least one folder (`files/x.png`); a bare word is not taken for one."""


class UnusableOutput(ValueError):
    """A result string that is neither an image URL this server may fetch nor image data."""


def resolve_output(value: str, base_url: str, *, inline: bool) -> OutputRef:
    """One result string as a reference to fetch or bytes to keep. Raises UnusableOutput with the reason.

    `inline`: the provider documents base64 results (a `data:` URI or a bare base64 string).
    """
    text = value.strip()
    lowered = text.lower()
    if lowered.startswith(("http://", "https://")):
        if not urlsplit(text).hostname:
            raise UnusableOutput("is an http(s) URL without a host")
        return OutputRef(url=text)
    if inline and (data := _base64(text)) is not None and looks_like_image(data):
        return OutputRef(data=data)  # before paths: base64 of a JPEG starts with "/9j/"
    if text.startswith("//"):
        raise UnusableOutput("is a URL without a scheme (//host/...), which this server does not guess")
    if text.startswith("/"):
        return OutputRef(url=urljoin(base_url.rstrip("/") + "/", text))
    if lowered.startswith("data:"):
        if not inline:
            raise UnusableOutput("is inline data (a data: URI), which this provider does not send")
        m = _DATA_URI.match(text)
        data = _base64(m.group(3)) if m else None
        if data is None:
            raise UnusableOutput("is a data: URI without valid base64 image data")
        return OutputRef(data=data, mime_type=m.group(1).lower() if m and m.group(1) else None)
    scheme = _SCHEME.match(text)
    if scheme:
        raise UnusableOutput(f"is a URL with the {scheme.group(1).lower()}: scheme, not http(s)")
    if _RELATIVE.match(text):
        return OutputRef(url=urljoin(base_url.rstrip("/") + "/", text))
    raise UnusableOutput("is neither an http(s) URL nor image data")


def resolve_outputs(values: Sequence[str], base_url: str, *,
                    inline: bool) -> tuple[list[OutputRef], list[str]]:
    """Every result string resolved: the usable ones, and why each other one is not (`output 2 of 3 is`)."""
    refs: list[OutputRef] = []
    problems: list[str] = []
    for i, value in enumerate(values):
        try:
            refs.append(resolve_output(value, base_url, inline=inline))
        except UnusableOutput as exc:
            which = "its output" if len(values) == 1 else f"output {i + 1} of {len(values)}"
            problems.append(f"{which} {exc}")
    return refs, problems


def finished(label: str, values: Sequence[str], base_url: str, *, inline: bool, empty: str,
             cost_usd: float | None = None, remaining_credits: float | None = None) -> JobState:
    """The state of a job the provider says succeeded, from its result strings.

    Usable outputs make a success (noting any unusable ones); none at all is a failure: `empty` when
    the provider gave no result, else the reason each result could not be used.
    """
    refs, problems = resolve_outputs(values, base_url, inline=inline)
    if refs:
        note = (f"{label} sent {len(problems)} unusable result(s), not kept: {'; '.join(problems)}."
                if problems else None)
        return JobState(status="succeeded", outputs=refs, error=note, cost_usd=cost_usd,
                        remaining_credits=remaining_credits)
    if problems:
        return JobState(status="failed", error_code="bad_output", cost_usd=cost_usd,
                        remaining_credits=remaining_credits,
                        error=f"{label} reported the job done, but {'; '.join(problems)}. This server "
                              "fetches only http(s) URLs, paths on the provider's own host and (where the "
                              "provider documents it) base64 image data. The job may have been charged.")
    return JobState(status="failed", error_code="no_output", error=empty, cost_usd=cost_usd,
                    remaining_credits=remaining_credits)


def looks_like_image(data: bytes) -> bool:
    """Whether `data` starts like a PNG, JPEG, GIF or WebP file (the formats providers answer with)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8"))


def _base64(payload: str) -> bytes | None:
    """Strictly decoded base64 (whitespace ignored), or None."""
    compact = "".join(payload.split())
    if not compact:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
