"""Lone UTF-16 surrogate escapes in JSON text (`"\\ud83d"` with no partner), replaced by U+FFFD.

Such an escape is valid JSON but not Unicode text. A JavaScript client sends one when it cuts a
string inside an emoji (`text.slice(0, n)`, then `JSON.stringify`). The SDK parses messages with
pydantic's JSON parser, which refuses the whole message, so the request's id is never read and
the call is never answered: the client waits forever.

The escape is replaced rather than the request refused: U+FFFD is exactly what the same client
would have sent had it encoded the string to UTF-8 itself (a `TextEncoder`, a browser's `fetch`
body, the WHATWG rule for any such string), the message keeps its id and its meaning, and a model
that cut a prompt inside an emoji gets its image instead of an error whose cause it cannot see.
The replacement has the same length (six bytes), so a declared Content-Length stays right.
"""

from __future__ import annotations

import re

REPLACEMENT = rb"\ufffd"
_HINT = re.compile(rb"\\u[dD][89a-fA-F]")
# Every escape in order (so an escaped backslash followed by "ud83d" is never read as an escape):
# a high+low pair (kept), a lone surrogate (replaced), or any other escape (kept).
_ESCAPE = re.compile(
    rb"\\(?:(u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})|(u[dD][89a-fA-F][0-9a-fA-F]{2})|.)",
    re.DOTALL)


def repair_surrogates(data: bytes) -> bytes | None:
    """`data` (JSON text) with every lone surrogate escape replaced by `\\ufffd`; None when it has none."""
    if not _HINT.search(data):
        return None
    replaced = 0

    def fix(match: re.Match[bytes]) -> bytes:
        nonlocal replaced
        if match.group(2) is not None:
            replaced += 1
            return REPLACEMENT
        return match.group(0)

    repaired = _ESCAPE.sub(fix, data)
    return repaired if replaced else None
