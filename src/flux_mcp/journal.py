"""The durable record of every prediction, in SQLite under FLUX_MCP_HOME.

A job is written here right after the provider accepts it and before the server waits on it, and
every outcome is written when it is known, so `check_prediction` answers for any id this server
ever returned, also after a restart or a crash. WAL mode with `synchronous=NORMAL` survives a
killed process. No key or token is ever stored: requests are kept as the server's own parameters.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models import ImageOutput, PredictionResult

RECENT = 20
"""A model's typical duration is the median of its last this-many successful jobs."""
_RECENT_TTL = 60.0
"""Seconds the remembered durations are trusted before the file is read again."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    native_id TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    cost_usd REAL,
    remaining_credits REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS predictions_model ON predictions (provider, model, status, completed_at);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL,
    provider TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (sha256, provider)
);
"""


@dataclass
class Record:
    """One prediction as the journal holds it."""

    id: str
    provider: str
    native_id: str
    model: str
    kind: str
    status: str
    request: dict[str, Any]
    images: list[ImageOutput] = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)
    """The provider's output URLs (None for inline outputs), kept to re-download after a failure."""
    error: str | None = None
    cost_usd: float | None = None
    remaining_credits: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    completed_at: float | None = None

    def result(self) -> PredictionResult:
        return PredictionResult(
            prediction_id=self.id,
            provider=self.provider,
            model=self.model,
            status=self.status,  # type: ignore[arg-type]
            images=self.images,
            error=self.error,
            cost_usd=self.cost_usd,
            remaining_credits=self.remaining_credits,
        )


class Journal:
    """A thread-safe SQLite journal. Every call is short; it is fine to call from the event loop."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str], tuple[float, list[tuple[str, float]]]] = {}
        """(provider, model) -> (when read, [(prediction id, duration)] newest first)."""
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        try:
            path.chmod(0o600)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, rec: Record) -> None:
        self._finished(rec)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO predictions (id, provider, native_id, model, kind, status, request, images,"
                " outputs, error, cost_usd, remaining_credits, created_at, updated_at, completed_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.id, rec.provider, rec.native_id, rec.model, rec.kind, rec.status,
                    json.dumps(rec.request), _dump_images(rec.images), json.dumps(rec.outputs), rec.error,
                    rec.cost_usd, rec.remaining_credits, rec.created_at, rec.updated_at, rec.completed_at,
                ),
            )

    def update(self, rec: Record) -> None:
        rec.updated_at = time.time()
        self._finished(rec)
        with self._lock:
            self._db.execute(
                "UPDATE predictions SET status=?, request=?, images=?, outputs=?, error=?, cost_usd=?,"
                " remaining_credits=?, updated_at=?, completed_at=? WHERE id=?",
                (
                    rec.status, json.dumps(rec.request), _dump_images(rec.images), json.dumps(rec.outputs),
                    rec.error, rec.cost_usd,
                    rec.remaining_credits, rec.updated_at, rec.completed_at, rec.id,
                ),
            )

    def get(self, prediction_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, provider, native_id, model, kind, status, request, images, outputs, error, cost_usd,"
                " remaining_credits, created_at, updated_at, completed_at FROM predictions WHERE id=?",
                (prediction_id,),
            ).fetchone()
        if row is None:
            return None
        return Record(
            id=row[0], provider=row[1], native_id=row[2], model=row[3], kind=row[4], status=row[5],
            request=json.loads(row[6]), images=[ImageOutput(**i) for i in json.loads(row[7])],
            outputs=json.loads(row[8]), error=row[9], cost_usd=row[10], remaining_credits=row[11],
            created_at=row[12], updated_at=row[13], completed_at=row[14],
        )

    def typical_duration(self, provider: str, model: str) -> float | None:
        """Median seconds from submit to completion of this model's last RECENT successful jobs.

        The durations are read once and then kept up to date as this journal records finished jobs
        (re-read after a minute, for jobs that other processes sharing the file finished)."""
        key = (provider, model)
        with self._lock:
            cached = self._recent.get(key)
            if cached is None or time.monotonic() - cached[0] >= _RECENT_TTL:
                rows = self._db.execute(
                    "SELECT id, completed_at - created_at FROM predictions WHERE provider=? AND model=? AND"
                    " status='succeeded' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT ?",
                    (provider, model, RECENT),
                ).fetchall()
                cached = (time.monotonic(), [(r[0], r[1]) for r in rows if r[1] is not None and r[1] >= 0])
                self._recent[key] = cached
            durations = [d for _, d in cached[1]]
        return statistics.median(durations) if len(durations) >= 2 else None

    def _finished(self, rec: Record) -> None:
        """Adds a newly finished job's duration to the remembered ones (once, however often it is written)."""
        if rec.status != "succeeded" or rec.completed_at is None or rec.completed_at < rec.created_at:
            return
        with self._lock:
            cached = self._recent.get((rec.provider, rec.model))
            if cached is not None and all(rid != rec.id for rid, _ in cached[1]):
                cached[1].insert(0, (rec.id, rec.completed_at - rec.created_at))
                del cached[1][RECENT:]

    def upload_url(self, sha256: str, provider: str, max_age: float) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT url, created_at FROM uploads WHERE sha256=? AND provider=?", (sha256, provider)
            ).fetchone()
        if row and time.time() - row[1] < max_age:
            return str(row[0])
        return None

    def add_upload(self, sha256: str, provider: str, url: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO uploads (sha256, provider, url, created_at) VALUES (?,?,?,?)",
                (sha256, provider, url, time.time()),
            )


def _dump_images(images: list[ImageOutput]) -> str:
    return json.dumps([i.model_dump() for i in images])
