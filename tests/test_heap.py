"""The collector settings of a serving process (`flux_mcp.heap`), and only there."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from flux_mcp import heap
from tests.conftest import connect


@pytest.mark.anyio
async def test_a_job_in_process_leaves_the_callers_collector_alone(settings, fake):
    """A test or a library caller running jobs through build_server in its own process keeps its collector
    as it was: nothing of its heap frozen (it would never be freed), its thresholds its own."""
    count, thresholds = gc.get_freeze_count(), gc.get_threshold()
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse"})  # makes the job machinery
    assert not result.is_error
    assert (gc.get_freeze_count(), gc.get_threshold()) == (count, thresholds)


def test_a_serving_process_freezes_what_it_has_and_what_it_makes_later():
    code = (
        "import gc; from flux_mcp import heap; heap.serving(); n = gc.get_freeze_count(); "
        "made_later = [[] for _ in range(1000)]; heap.settled(); "
        "print(n > 0, gc.get_freeze_count() >= n + 1000, gc.get_threshold() == heap.THRESHOLDS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True"]
