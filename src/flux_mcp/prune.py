"""Retention: removing old images and journal rows from the data folder.

Only finished jobs (succeeded, failed, canceled) older than the cut-off go, and of their images only the
copies the image store keeps in the data folder — never a `save_to` copy in a project, never anything of
a pending job. `FLUX_MCP_KEEP_DAYS` prunes at server start; `flux-mcp prune` does it by hand, with
`--dry-run` listing what would go. Failover attempts (rows that only inform the choice of provider in the
next minutes) go once older than a day, or than the cut-off when that is sooner. A read-only data folder
is left as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

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
                if location and location not in done.files:
                    if dry_run or await store.discard(location):
                        done.files.append(location)
            done.predictions.append(record.id)
        if not dry_run:
            await journal.remove([r.id for r in batch], uploads_before=cutoff)
        if len(batch) < BATCH:
            return done
