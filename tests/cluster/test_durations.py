"""What a shared journal learns of a model's job length (the first status request of every later job is
planned from it): only from jobs watched to the end by the call that submitted them. A job another replica
took over (or a later call claimed) was seen finished only when its new holder first asked, seconds or
minutes late; a burst of such takeovers after a replica died must not teach every replica to wait that
much longer before asking about a new job."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flux_mcp.journal import Record
from flux_mcp.journal_pg import PgJournal
from tests.conftest import pg_env

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


def _job(n: int, status: str, created: float, took: float | None = None) -> Record:
    return Record(id=f"atlascloud:pred_{n:04d}", provider="atlascloud", native_id=f"pred_{n:04d}",
                  model="flux-dev", kind="generate", status=status, request={"prompt": "p"},  # type: ignore[arg-type]
                  created_at=created, completed_at=None if took is None else created + took)


async def test_jobs_finished_after_a_takeover_do_not_teach_a_longer_job(request: pytest.FixtureRequest) -> None:
    url = pg_env(request)["FLUX_MCP_DATABASE_URL"]
    first, taker = await PgJournal.open(url), await PgJournal.open(url)
    try:
        now = time.time()
        for n in range(3):  # watched to the end by their own call: 5 s each
            await first.put(_job(n, "succeeded", now - 60, 5.0))
        for n in range(3, 7):  # left pending (their replica died), claimed by the taker, seen done 60 s in
            await first.put(_job(n, "processing", now - 60))
            claimed = await taker.claim(f"atlascloud:pred_{n:04d}")
            assert claimed is not None
            claimed.status, claimed.completed_at = "succeeded", claimed.created_at + 60.0
            await taker.put(claimed)
        fresh = await PgJournal.open(url)  # another replica, reading the journal
        try:
            learned: list[Any] = [await j.typical_duration("atlascloud", "flux-dev") for j in (first, taker, fresh)]
        finally:
            await fresh.close()
    finally:
        await first.close()
        await taker.close()
    assert learned == [5.0, 5.0, 5.0]
