"""Budgets and the spend ledger, against the providers' fakes: what a job costs, what counts against
FLUX_MCP_BUDGET_DAY_USD / _MONTH_USD / FLUX_MCP_MAX_IMAGES_PER_DAY, and what never does."""

from __future__ import annotations

import re
import threading
import time
import uuid

import anyio
import pytest

from flux_mcp.errors import SpendRefused
from flux_mcp.journal import Charge, LedgerUnavailable, open_journal
from flux_mcp.money import Estimate, Money, month_start
from flux_mcp.request import JobRequest
from tests.conftest import ATLAS_BASE, ATLAS_KEY, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.base import RESET
from tests.fakes.segmind import SegmindFake
from tests.money_helpers import Clock, at, charges, serve

pytestmark = pytest.mark.anyio
UNPRICED = "wavespeed-ai/flux-schnell"
"""An Atlas Cloud model with no documented price."""


@pytest.fixture
def budget(make_settings):
    def make(**env: str):
        return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE, **env)

    return make


async def test_parallel_calls_reserve_at_submit_so_they_exactly_exhaust_the_budget(budget, home):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)  # every job stays pending: only reservations can count
    results: list = []
    async with serve(budget(FLUX_MCP_BUDGET_DAY_USD="0.009", ATLASCLOUD_SYNC_MODE="off"), fake) as client:

        async def call() -> None:
            results.append(await client.call_tool("generate_image", {"prompt": "a lighthouse", "wait_seconds": 0}))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(call)
    made = [r for r in results if not r.is_error]
    refused = [text_of(r) for r in results if r.is_error]
    assert len(made) == 3 and len(fake.ledger) == 3  # 3 x $0.003 = the budget, exactly
    assert len(refused) == 2
    assert all("$0.009 of the FLUX_MCP_BUDGET_DAY_USD limit of $0.009" in t and "Nothing was submitted" in t
               for t in refused)
    rows = await charges(home)
    assert sorted(r.state for r in rows) == ["billed"] * 3


def test_reservations_of_two_processes_sharing_the_journal_never_overspend(home):
    """Two servers on one data folder: the sum and the insert of a reservation are one transaction."""
    home.mkdir(parents=True)
    open_journal(home)  # created and migrated once, as at server start
    limit, each, tries = 0.02, 0.001, 30
    start = threading.Barrier(2)
    refusals: list[str] = []

    def slow_check(totals) -> str | None:
        time.sleep(0.002)  # a busy process between reading the sums and recording its row: the other one runs
        return None if totals["day"].usd + each <= limit + 1e-9 else "over"

    def server() -> None:
        async def reserve_all() -> None:
            journal = open_journal(home)
            try:
                for _ in range(tries):
                    start.wait(30)  # both processes reserve at the same moment, every time
                    charge = Charge(id=uuid.uuid4().hex, principal="local", provider="atlascloud", model="m",
                                    images=1, usd=each)
                    refused = await journal.reserve(charge, {"day": 0.0}, slow_check)
                    if refused:
                        refusals.append(refused)
            finally:
                await journal.close()

        anyio.run(reserve_all)

    threads = [threading.Thread(target=server) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)

    async def count() -> list[Charge]:
        return await charges(home)

    rows = anyio.run(count)
    assert len(rows) == 20 and len(refusals) == 2 * tries - 20
    assert round(sum(r.usd or 0 for r in rows), 9) == limit


async def test_a_submit_the_provider_refused_costs_nothing(budget, home):
    fake = AtlasFake(key=ATLAS_KEY)
    fake.submit_errors = [(402, {"code": 402, "message": "insufficient balance"}, {})]
    async with serve(budget(FLUX_MCP_BUDGET_DAY_USD="0.006"), fake) as client:
        refused = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        assert refused.is_error and "balance" in text_of(refused)
        assert await charges(home) == []
        made = [await client.call_tool("generate_image", {"prompt": "a lighthouse"}) for _ in range(2)]
        assert not any(r.is_error for r in made)  # the refused call left the whole budget
        over = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
    assert over.is_error and "$0.006 of the FLUX_MCP_BUDGET_DAY_USD limit of $0.006" in text_of(over)
    assert len(fake.ledger) == 2


async def test_a_job_that_may_have_started_counts_against_the_budget(budget, home):
    fake = AtlasFake(key=ATLAS_KEY)
    fake.submit_errors = [RESET]  # the request arrived; the answer never came: a job may exist
    async with serve(budget(FLUX_MCP_BUDGET_DAY_USD="0.006"), fake) as client:
        unknown = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        assert unknown.is_error
        made = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        assert not made.is_error
        over = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
    assert over.is_error and "$0.006 of the FLUX_MCP_BUDGET_DAY_USD limit" in text_of(over)
    assert sorted(r.state for r in await charges(home)) == ["billed", "unknown"]


async def test_without_a_budget_every_job_is_still_in_the_ledger_with_one_commit_less(budget, home):
    """No limit to keep: the charge is written with the job's id (billed), or as unknown when the submit's
    outcome is; a refused submit leaves none. Each finished job costs the journal two commits."""
    import sqlite3

    fake = AtlasFake(key=ATLAS_KEY)
    fake.submit_errors = [(402, {"code": 402, "message": "insufficient balance"}, {}), RESET]
    commits: list[str] = []
    connect = sqlite3.connect

    def counting(*args, **kw):
        db = connect(*args, **kw)
        db.set_trace_callback(lambda sql: commits.append(sql) if sql.startswith(("INSERT", "UPDATE", "COMMIT"))
                              and "BEGIN" not in sql else None)
        return db

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlite3, "connect", counting)
        async with serve(budget(), fake) as client:
            refused = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
            unknown = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
            commits.clear()
            made = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
            written = [" ".join(re.match(r"(INSERT|UPDATE)(?: OR \w+)?(?: INTO)? (\w+)", c).groups())  # type: ignore[union-attr]
                       for c in commits if not c.startswith("COMMIT")]
    assert refused.is_error and unknown.is_error and not made.is_error
    rows = sorted(await charges(home), key=lambda r: r.created_at)
    assert [r.state for r in rows] == ["unknown", "billed"]
    assert rows[1].prediction_id == made.structured_content["prediction_id"] and rows[1].usd == 0.003
    # the id with its charge (one transaction), then the kept images; the delivered mark comes later
    assert written == ["INSERT predictions", "INSERT charges", "INSERT predictions"], written


async def test_the_month_budget_rolls_over_on_the_first_at_midnight_utc(budget):
    clock = Clock("2026-01-31T23:59:00Z")
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(budget(FLUX_MCP_BUDGET_MONTH_USD="0.006"), fake, clock=clock) as client:
        for _ in range(2):
            assert not (await client.call_tool("generate_image", {"prompt": "p"})).is_error
        over = await client.call_tool("generate_image", {"prompt": "p"})
        assert over.is_error
        assert "FLUX_MCP_BUDGET_MONTH_USD" in text_of(over) and "on the 1st at 00:00 UTC" in text_of(over)
        clock.set("2026-02-01T00:00:00Z")
        assert not (await client.call_tool("generate_image", {"prompt": "p"})).is_error
    assert len(fake.ledger) == 3
    assert month_start(at("2026-02-14T12:00:00Z")) == at("2026-02-01T00:00:00Z")


async def test_the_day_budget_rolls_over_at_midnight_utc(budget):
    clock = Clock("2026-03-10T23:59:59Z")
    fake = AtlasFake(key=ATLAS_KEY)
    async with serve(budget(FLUX_MCP_BUDGET_DAY_USD="0.003"), fake, clock=clock) as client:
        assert not (await client.call_tool("generate_image", {"prompt": "p"})).is_error
        over = await client.call_tool("generate_image", {"prompt": "p"})
        assert over.is_error and "resets at 00:00 UTC" in text_of(over)
        clock.advance(1)
        assert not (await client.call_tool("generate_image", {"prompt": "p"})).is_error
    assert len(fake.ledger) == 2


async def test_an_unpriced_model_is_held_by_the_image_cap_not_the_dollar_budget(budget):
    fake = AtlasFake(key=ATLAS_KEY, price=None)  # the provider reports no price either
    settings = budget(FLUX_MCP_BUDGET_DAY_USD="0.001", FLUX_MCP_MAX_IMAGES_PER_DAY="3")
    async with serve(settings, fake) as client:
        two = await client.call_tool("generate_image", {"prompt": "p", "model": UNPRICED, "num_images": 2})
        assert not two.is_error and two.structured_content["cost_usd"] is None
        assert "dollars are not counted" in text_of(two)
        one = await client.call_tool("generate_image", {"prompt": "p", "model": UNPRICED})
        assert not one.is_error
        over = await client.call_tool("generate_image", {"prompt": "p", "model": UNPRICED})
    text = text_of(over)
    assert over.is_error and "3 of the FLUX_MCP_MAX_IMAGES_PER_DAY limit of 3" in text
    assert "raise FLUX_MCP_MAX_IMAGES_PER_DAY" in text
    assert len(fake.ledger) == 2


async def test_the_providers_own_figure_replaces_the_estimate_in_the_result_and_the_ledger(budget, home):
    fake = AtlasFake(key=ATLAS_KEY, price=0.0025)
    async with serve(budget(), fake) as client:
        reported = (await client.call_tool("generate_image", {"prompt": "p"})).structured_content
        fake.price = None
        guessed = await client.call_tool("generate_image", {"prompt": "p"})
    assert (reported["cost_usd"], reported["cost_estimated"]) == (0.0025, False)
    assert (guessed.structured_content["cost_usd"], guessed.structured_content["cost_estimated"]) == (0.003, True)
    assert "Cost: $0.0030 (estimated" in text_of(guessed)
    rows = {r.prediction_id: r for r in await charges(home)}
    assert (rows[reported["prediction_id"]].usd, rows[reported["prediction_id"]].estimated) == (0.0025, False)
    assert (rows[guessed.structured_content["prediction_id"]].usd,
            rows[guessed.structured_content["prediction_id"]].estimated) == (0.003, True)


async def test_segminds_cost_header_is_reported_and_its_absence_is_an_estimate(make_settings):
    key = "SG_5e9c4a7b1d3f8e20"
    settings = make_settings(SEGMIND_API_KEY=key, SEGMIND_BASE_URL="http://segmind.test")
    fake = SegmindFake(key=key)
    async with serve(settings, fake) as client:
        reported = (await client.call_tool("generate_image", {"prompt": "p"})).structured_content
        fake.report_cost = False
        guessed = (await client.call_tool("generate_image", {"prompt": "p"})).structured_content
    assert reported["cost_estimated"] is False and reported["cost_usd"] == fake.prices["flux-schnell"]
    assert guessed["cost_estimated"] is True and guessed["cost_usd"] == 0.008


async def test_the_offline_placeholder_is_free_and_stays_out_of_the_ledger(make_settings, home):
    async with serve(make_settings(FLUX_MCP_MAX_IMAGES_PER_DAY="1"), None) as client:
        for _ in range(2):
            result = await client.call_tool("generate_image", {"prompt": "p"})
            assert not result.is_error and result.structured_content["placeholder"] is True
    assert await charges(home) == []


class _FullDisk:
    """A journal whose spend ledger can be neither read nor written (the disk is full)."""

    async def totals(self, *args: object) -> None:
        raise LedgerUnavailable("The spend ledger in /data cannot be written (database or disk is full).")

    reserve = totals


async def test_a_ledger_that_cannot_be_written_refuses_under_a_budget_and_is_skipped_without(make_settings):
    est = Estimate("atlascloud", "Atlas Cloud", "black-forest-labs/flux-schnell", 1, 0.003, "documented price")
    req = JobRequest(prompt="p")
    budgeted = Money(make_settings(FLUX_MCP_BUDGET_DAY_USD="1"), _FullDisk())  # type: ignore[arg-type]
    with pytest.raises(SpendRefused, match="cannot be kept without it, so nothing was submitted"):
        await budgeted.before_paying(est, req, "local", None)
    free = Money(make_settings(), _FullDisk())  # type: ignore[arg-type]
    hold = await free.before_paying(est, req, "local", None)
    assert hold.charge is None  # no budget to keep: the call goes ahead, unrecorded
