"""save_to: every check that can be made before paying is made before paying; a copy that cannot be
written leaves the kept (and paid) image in the result; names are chosen when the file is written."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio


async def test_a_save_to_under_a_file_is_refused_before_paying(settings, fake, workspace: Path):
    (workspace / "public").write_text("not a folder")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/hero.png"})
    assert result.is_error and "is a file, not a folder" in text_of(result)
    assert fake.ledger == []


async def test_a_name_too_long_for_the_file_system_is_refused_before_paying(settings, fake):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "x" * 300 + ".png"})
    assert result.is_error and "255" in text_of(result)
    assert fake.ledger == []


async def test_a_copy_that_cannot_be_written_leaves_the_kept_image_in_every_result(settings, workspace: Path):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "save_to": "out/hero.png",
                                                          "wait_seconds": 0})
        (workspace / "out").write_text("became a file after the job was paid for")
        [job_id] = fake.jobs
        fake.finish(job_id)
        pid = first.structured_content["prediction_id"]
        done = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 5})
        again = await client.call_tool("check_prediction", {"prediction_id": pid})
    for result in (done, again):
        sc = result.structured_content
        assert sc["status"] == "succeeded", text_of(result)
        path = sc["images"][0]["path"]
        assert path and Path(path).is_file() and "flux-home" in path
        assert "was not written to" in sc["error"]
    assert len(fake.ledger) == 1


async def test_outputs_beyond_what_was_asked_are_not_kept_and_the_result_says_so(settings):
    fake = AtlasFake(key=ATLAS_KEY, extra_outputs=3)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 1})
    sc = result.structured_content
    assert sc["status"] == "succeeded" and len(sc["images"]) == 1
    assert "returned 4 images for 1 asked" in sc["error"]
    downloads = [r for r in fake.requests if "/files/" in r]
    assert len(downloads) <= 1


async def test_concurrent_calls_saving_into_one_folder_all_land(settings, workspace: Path):
    # Eight same-prompt calls plan their copies while no file exists yet; the names are taken at write time.
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as client:
        pending = [await client.call_tool("generate_image", {"prompt": "same prompt", "save_to": "art/",
                                                             "wait_seconds": 0}) for _ in range(8)]
        for job_id in list(fake.jobs):
            fake.finish(job_id)
        results: list = []

        async def check(result) -> None:
            results.append(await client.call_tool("check_prediction", {
                "prediction_id": result.structured_content["prediction_id"], "wait_seconds": 5}))

        async with anyio.create_task_group() as tg:
            for result in pending:
                tg.start_soon(check, result)
    paths = [r.structured_content["images"][0]["path"] for r in results]
    assert all(r.structured_content["status"] == "succeeded" and not r.structured_content["error"]
               for r in results), [text_of(r) for r in results]
    assert len(set(paths)) == 8 and all(Path(p).parent == workspace / "art" for p in paths)
    assert len(os.listdir(workspace / "art")) == 8
    assert len(fake.ledger) == 8


async def test_two_servers_finishing_the_same_job_both_report_the_copy(settings, workspace: Path):
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    async with connect(settings, fake) as first, connect(settings, fake) as second:
        started = await first.call_tool("generate_image", {"prompt": "p", "save_to": "one.png", "wait_seconds": 0})
        pid = started.structured_content["prediction_id"]
        results: list = []

        async def check(client) -> None:
            results.append(await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 10}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(check, first)
            tg.start_soon(check, second)
            while sum(1 for r in fake.requests if "/prediction/" in r) < 2:  # both are waiting on the job
                await anyio.sleep(0.01)
            fake.finish(next(iter(fake.jobs)))
    for result in results:
        sc = result.structured_content
        assert sc["status"] == "succeeded" and not sc["error"], text_of(result)
        assert sc["images"][0]["path"] == str(workspace / "one.png")
    assert len(fake.ledger) == 1


async def test_a_pending_jobs_copy_lands_in_the_folder_of_the_call_that_asked(make_settings, tmp_path: Path):
    project = tmp_path / "project-a"
    elsewhere = tmp_path / "project-b"
    project.mkdir()
    elsewhere.mkdir()
    fake = AtlasFake(key=ATLAS_KEY, hold=True)
    env = {"ATLASCLOUD_API_KEY": ATLAS_KEY, "ATLASCLOUD_BASE_URL": "http://atlas.test"}
    from flux_mcp.config import Settings

    asking = Settings.from_env({**env, "FLUX_MCP_HOME": str(tmp_path / "home")}, cwd=project)
    finishing = Settings.from_env({**env, "FLUX_MCP_HOME": str(tmp_path / "home")}, cwd=elsewhere)
    async with connect(asking, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/hero.png",
                                                          "wait_seconds": 0})
    [job_id] = fake.jobs
    fake.finish(job_id)
    async with connect(finishing, fake) as client:
        done = await client.call_tool("check_prediction", {"prediction_id": first.structured_content["prediction_id"],
                                                           "wait_seconds": 5})
    assert done.structured_content["status"] == "succeeded", text_of(done)
    assert (project / "public" / "hero.png").is_file()
    assert not (elsewhere / "public").exists()
