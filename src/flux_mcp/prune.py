"""Retention: removing old images and journal rows from the data folder.

Only finished jobs (succeeded, failed, canceled) older than the cut-off go, and of their images only the
copies the image store keeps in the data folder — never a `save_to` copy in a project, never anything of
a pending job. `FLUX_MCP_KEEP_DAYS` prunes at server start; `flux-mcp prune` does it by hand, with
`--dry-run` listing what would go. Failover attempts (rows that only inform the choice of provider in the
next minutes) go once older than a day, or than the cut-off when that is sooner. A read-only data folder
is left as it is.

In shared mode (PostgreSQL + S3) the same runs on the database and the bucket, and also:

* `unknown` jobs older than the cut-off go like finished ones (they have no images; nothing more will be
  learnt about them);
* spend-ledger reservations still `reserved`, with no job, older than the cut-off and than a day are
  released (deleted, never billed): their call's replica stopped before its submit was answered;
* cached provider upload URLs older than the cut-off;
* upload links' objects (`uploads/` in the bucket) once the file can no longer be used, and gallery
  login links and sessions (`gallery/`) once they expired: these go by their own lifetime, whatever
  the cut-off.

Nothing of a pending job goes, and `--dry-run` counts without removing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .assets import ORIGINAL_INDEX
from .journal import ATTEMPT_RETENTION, Journal
from .store import ImageStore

log = logging.getLogger("flux_mcp.prune")
BATCH = 500
DAY = 86_400.0


@dataclass
class Pruned:
    """What a prune removed (or, in a dry run, would remove)."""

    predictions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    attempts: int = 0
    """Failover attempt rows."""
    reservations: int = 0
    """Spend-ledger reservations released (shared mode)."""
    upload_urls: int = 0
    """Cached provider upload URLs (shared mode; the folder's journal drops them with each batch)."""
    objects: list[str] = field(default_factory=list)
    """Upload-link and gallery objects past their lifetime (shared mode)."""


@runtime_checkable
class SharedRetention(Protocol):
    """What a shared journal (`PgJournal`) removes besides predictions."""

    async def release_stale_reservations(self, before: float, *, dry_run: bool = False) -> int: ...

    async def remove_uploads(self, before: float, *, dry_run: bool = False) -> int: ...


@runtime_checkable
class ListedObjects(Protocol):
    """A store whose objects beside the images can be listed and deleted (`S3Store`)."""

    async def list_objects(self, prefix: str) -> list[tuple[str, float]]: ...

    async def get_object(self, name: str) -> bytes | None: ...

    async def delete_object(self, name: str) -> bool: ...


async def prune(journal: Journal, store: ImageStore, *, older_than_days: float, dry_run: bool = False,
                now: float | None = None) -> Pruned:
    """Removes finished jobs last updated more than `older_than_days` ago, with their stored images."""
    now = now if now is not None else time.time()
    cutoff = now - older_than_days * DAY
    done = Pruned()
    if why := journal.read_only():
        log.warning("nothing pruned: %s", why)
        return done
    done.attempts = await journal.remove_attempts(max(cutoff, now - ATTEMPT_RETENTION), dry_run=dry_run)
    if isinstance(journal, SharedRetention):
        done.reservations = await journal.release_stale_reservations(min(cutoff, now - DAY), dry_run=dry_run)
        done.upload_urls = await journal.remove_uploads(cutoff, dry_run=dry_run)
    if isinstance(store, ListedObjects):
        done.objects = await expired_objects(store, now, dry_run=dry_run)
    seen: set[str] = set()
    while True:
        batch = [r for r in await journal.finished_before(cutoff, BATCH) if r.id not in seen]
        if not batch:
            return done
        seen.update(r.id for r in batch)
        saved = {str(t) for r in batch for t in (r.request.get("save_to") or [])}
        for record in batch:
            for image in record.images:
                if not image.path or image.path in saved:
                    continue  # a save_to copy belongs to the project, not to the data folder
                if dry_run:
                    if await store.present(image.path):
                        done.files.append(image.path)
                elif await store.discard(image.path):
                    done.files.append(image.path)
            # The stored copy (when the result named the save_to copy), and a transparent image's unmatted one.
            for index in (*range(len(record.outputs)), *(ORIGINAL_INDEX + i for i in range(len(record.outputs)))):
                location = await store.find(record.id, index)
                if location and location not in done.files and (dry_run or await store.discard(location)):
                    done.files.append(location)
            done.predictions.append(record.id)
        if not dry_run:
            await journal.remove([r.id for r in batch], uploads_before=cutoff)
        if len(batch) < BATCH:
            return done


def _lifetime_end(folder: str, tickets: dict[str, bytes | None]) -> float | None:
    """When an upload link's or gallery link's folder stops being of use, from its ticket (None: unreadable)."""
    from .gallery.remote import SESSION_SECONDS
    from .uploads import KEEP_SECONDS

    for name, data in tickets.items():
        try:
            raw = json.loads(data or b"")
            created, expires = float(raw["created_at"]), float(raw["expires_at"])
        except (ValueError, KeyError, TypeError):
            continue
        if folder.startswith("uploads/"):
            return max(expires, created + KEEP_SECONDS)  # the file PUT to it is used for KEEP_SECONDS
        return expires if name.endswith(("login.json", "session.json")) else created + SESSION_SECONDS
    return None


_TICKETS = {"uploads/": ("ticket.json",), "gallery/": ("login.json", "session.json")}


async def expired_objects(store: ListedObjects, now: float, *, dry_run: bool = False) -> list[str]:
    """Removes upload-link folders (`uploads/<digest>/`) and gallery folders (`gallery/<digest>/`) whose link,
    file or session can no longer be used; a folder without a readable ticket goes once its newest object is
    older than the longest such lifetime. Returns the object names that (would) go."""
    from .gallery.remote import SESSION_SECONDS
    from .uploads import KEEP_SECONDS

    gone: list[str] = []
    for prefix, ticket_names in _TICKETS.items():
        folders: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for name, modified in await store.list_objects(prefix):
            folder, _, _ = name.rpartition("/")
            folders[folder].append((name, modified))
        for folder, objects in folders.items():
            names = {n for n, _ in objects}
            tickets = {t: await store.get_object(f"{folder}/{t}") for t in ticket_names if f"{folder}/{t}" in names}
            end = _lifetime_end(folder + "/", tickets)
            if end is None:
                end = max(m for _, m in objects) + max(KEEP_SECONDS, SESSION_SECONDS)
            if now <= end:
                continue
            for name, _ in sorted(objects):
                if dry_run or await store.delete_object(name):
                    gone.append(name)
    return gone
