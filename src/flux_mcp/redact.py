"""Scrubbing secrets out of any text that may reach a user, a log or a file.

Providers sometimes echo the key in an error body, and exceptions from the HTTP stack carry
request URLs and headers. Provider text is scrubbed at the boundaries where it crosses into state
or output: the job runner scrubs every record before it is journaled or returned
(`scrub_record`), the MCP layer scrubs every tool result and progress message, and
`protect_logs` scrubs every log record the process creates. Adapters scrub what they build too,
as defence in depth.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable
from typing import Any

MASK = "[redacted]"
# Any 12-character window of a secret counts as "a long part of one".
_WINDOW = 12
_HEADER_RE = re.compile(
    r"(?i)\b(authorization|x-api-key|api-key|ocp-apim-subscription-key|bearer)(\s*[:=]?\s*)([^\s,;\"']{6,})"
)


class Redactor:
    """Replaces every known secret, and any long piece of one, with a mask."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: list[str] = []
        self._windows: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < 6 or secret in self._secrets:
            return
        self._secrets.append(secret)
        self._secrets.sort(key=len, reverse=True)
        if len(secret) > _WINDOW:
            for i in range(len(secret) - _WINDOW + 1):
                self._windows.add(secret[i : i + _WINDOW])

    def scrub(self, text: str) -> str:
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if self._windows and len(text) >= _WINDOW:
            text = self._scrub_windows(text)
        return _HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)

    def _scrub_windows(self, text: str) -> str:
        # Mark every position covered by a window of a secret, then mask the covered runs.
        covered = bytearray(len(text))
        found = False
        for i in range(len(text) - _WINDOW + 1):
            if text[i : i + _WINDOW] in self._windows:
                covered[i : i + _WINDOW] = b"\x01" * _WINDOW
                found = True
        if not found:
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            if covered[i]:
                while i < len(text) and covered[i]:
                    i += 1
                out.append(MASK)
            else:
                out.append(text[i])
                i += 1
        return "".join(out)


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs the formatted message of every record."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_log_record(record, self.redactor)
        if record.exc_text:
            record.exc_text = self.redactor.scrub(record.exc_text)
        return True


_LOG_REDACTOR = Redactor()
"""Every secret any server in this process was given: scrubbed from every log record, whoever logs it."""
_factory_installed = False


def protect_logs(secrets: Iterable[str]) -> None:
    """Scrubs `secrets` (and long pieces of them) out of every log record this process creates, at
    creation, so no handler — a file, stderr, a test's capture — ever sees them. Idempotent."""
    global _factory_installed
    for secret in secrets:
        _LOG_REDACTOR.add(secret)
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _LOG_REDACTOR._secrets:
            _scrub_log_record(record, _LOG_REDACTOR)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def _scrub_log_record(record: logging.LogRecord, redactor: Redactor) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not kill logging
        message = str(record.msg)
    record.msg = redactor.scrub(message)
    record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redactor.scrub("".join(traceback.format_exception(*record.exc_info)).rstrip())
        record.exc_info = None
