"""Which journal and image store a server uses: SQLite and the data folder, or PostgreSQL and a bucket.

`open_journal(settings)` and `open_store(settings)` are the one place that decides: FLUX_MCP_DATABASE_URL
selects the PostgreSQL journal (shared mode), FLUX_MCP_S3_URL the S3-compatible store; without them a
single server keeps everything in FLUX_MCP_HOME as before.
"""

from __future__ import annotations

import logging

from .config import Settings
from .journal import Journal
from .journal import open_journal as open_sqlite_journal
from .store import FolderStore, ImageStore

log = logging.getLogger("flux_mcp")


async def open_journal(settings: Settings) -> Journal:
    """The journal `settings` select, opened (and migrated); raises JournalUnusable when it cannot be used."""
    if settings.database_url is not None:
        from .journal_pg import PgJournal

        listen = settings.listen_database_url
        return await PgJournal.open(settings.database_url.get_secret_value(), lease_seconds=settings.lease_seconds,
                                    listen_url=listen.get_secret_value() if listen else None)
    return open_sqlite_journal(settings.home)


def open_store(settings: Settings) -> ImageStore:
    """The image store `settings` select (nothing is contacted until it is used)."""
    if settings.s3_url:
        from .store_s3 import S3Location, S3Store

        return S3Store(S3Location.parse(settings.s3_url), settings.s3, presign_seconds=settings.presign_seconds)
    return FolderStore(settings.home)


async def check_backends(settings: Settings) -> None:
    """Opens and closes the journal (raises JournalUnusable): run before serving, so a database or data
    folder that cannot be used is one clear line at start instead of a failure at the first call."""
    journal = await open_journal(settings)
    if note := journal.read_only():
        log.warning("%s", note)  # once, at start; check_prediction's answers repeat it
    await journal.close()
