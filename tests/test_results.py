"""Results a coding assistant can use: previews within client limits, files in the workspace, resources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mcp_types import ListRootsResult, Root
from PIL import Image

from flux_mcp.errors import PathNotAllowed
from flux_mcp.paths import PathPolicy
from tests.conftest import ATLAS_BASE, ATLAS_KEY, connect, text_of

pytestmark = pytest.mark.anyio
BASE = ATLAS_BASE


async def test_2048_result_fits_claude_desktop_limit_and_full_image_stays_on_disk(settings, fake):
    fake.image_size, fake.noisy_images = (2048, 2048), True
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "width": 1024, "height": 1024})
    wire = result.model_dump_json(by_alias=True, exclude_none=True)
    assert len(wire.encode()) < 1_000_000
    previews = [b for b in result.content if b.type == "image"]
    assert len(previews) == 1 and previews[0].mime_type == "image/jpeg"
    image = result.structured_content["images"][0]
    assert (image["width"], image["height"]) == (2048, 2048)
    assert Path(image["path"]).stat().st_size > 5_000_000 and image["path"] in text_of(result)


async def test_several_large_images_share_the_budget(settings, fake):
    fake.image_size, fake.noisy_images = (1024, 1024), True
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "num_images": 4})
    assert len([b for b in result.content if b.type == "image"]) == 4
    assert len(result.model_dump_json(by_alias=True).encode()) < 1_000_000


async def test_previews_off_leaves_paths_and_urls_in_the_text(make_settings, fake):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=BASE, FLUX_MCP_PREVIEW="off",
                             ATLASCLOUD_SYNC_MODE="off")
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    assert not [b for b in result.content if b.type == "image"]
    image = result.structured_content["images"][0]
    assert image["path"] in text_of(result) and image["url"] in text_of(result)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
async def test_written_images_are_ordinary_files_and_leave_no_temp_files(settings, fake, workspace, home):
    umask = os.umask(0o022)
    os.umask(umask)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "art/new/dir/"})
    [image] = result.structured_content["images"]
    kept = list((home / "images").rglob("*"))
    for path in [Path(image["path"]), *[k for k in kept if k.is_file()]]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert Path(image["path"]).is_relative_to(workspace / "art" / "new" / "dir")
    leftovers = [p.name for p in [*workspace.rglob("*"), *kept] if p.name.endswith(".part")]
    assert leftovers == []


async def test_save_to_webp_in_the_workspace_carries_its_provenance(settings, fake, workspace):
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a hero banner, teal", "seed": 42,
                                                           "save_to": "assets/hero.webp"})
    target = workspace / "assets" / "hero.webp"
    pid = result.structured_content["prediction_id"]
    with Image.open(target) as im:
        assert im.format == "WEBP"
        xmp = im.info.get("xmp", b"")
        exif = im.getexif()
    xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
    assert "a hero banner, teal" in xmp and pid in xmp and "atlascloud" in xmp and "<flux:seed>42<" in xmp
    assert exif[0x010E] == "a hero banner, teal"
    assert "assets/hero.webp" in text_of(result)


async def test_save_to_jpg_converts_and_keeps_provenance(settings, fake, workspace):
    async with connect(settings, fake) as client:
        await client.call_tool("generate_image", {"prompt": "night city", "save_to": "out/city.jpg"})
    with Image.open(workspace / "out" / "city.jpg") as im:
        assert im.format == "JPEG" and "night city" in im.info["xmp"].decode()


async def test_save_to_outside_the_workspace_is_refused_before_paying(settings, fake, tmp_path):
    async with connect(settings, fake) as client:
        escape = await client.call_tool("generate_image", {"prompt": "p", "save_to": "../elsewhere/x.png"})
        absolute = await client.call_tool("generate_image", {"prompt": "p", "save_to": str(tmp_path / "x.png")})
        bad_ext = await client.call_tool("generate_image", {"prompt": "p", "save_to": "x.gif"})
    assert escape.is_error and "outside the allowed folders" in text_of(escape)
    assert absolute.is_error and "outside the allowed folders" in text_of(absolute)
    assert bad_ext.is_error and ".png, .jpg, .jpeg or .webp" in text_of(bad_ext)
    assert fake.ledger == []


async def test_relative_save_to_lands_in_the_clients_root(settings, fake, tmp_path):
    project = tmp_path / "client-root"
    project.mkdir()

    async def roots(_ctx):
        return ListRootsResult(roots=[Root(uri=project.as_uri(), name="project")])

    async with connect(settings, fake, mode="legacy", list_roots_callback=roots) as client:
        result = await client.call_tool("generate_image", {"prompt": "p", "save_to": "public/logo.png"})
    assert result.structured_content["images"][0]["path"] == str(project / "public" / "logo.png")
    assert (project / "public" / "logo.png").is_file()


def test_windows_drive_paths_are_understood_and_checked(tmp_path):
    policy = PathPolicy([tmp_path], tmp_path / "home")
    with pytest.raises(PathNotAllowed, match="is a Windows path"):
        policy.check_write(r"C:\Users\me\project\hero.png")
    assert policy.check_write("public\\img\\hero.png") == tmp_path / "public" / "img" / "hero.png"
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        policy.check_write("..\\..\\etc\\x.png")


def test_home_and_root_are_never_allowed_folders(tmp_path):
    from flux_mcp.paths import usable_folders

    assert usable_folders([Path("/"), Path.home()], tmp_path) == []
    assert usable_folders([tmp_path], tmp_path / "h") == [tmp_path.resolve()]


async def test_full_previews_put_the_original_image_inline(make_settings, fake):
    settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=BASE, FLUX_MCP_PREVIEW="full")
    fake.image_size = (300, 200)
    async with connect(settings, fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "p"})
    [preview] = [b for b in result.content if b.type == "image"]
    import base64

    assert base64.b64decode(preview.data) == Path(result.structured_content["images"][0]["path"]).read_bytes()


def test_preview_of_a_very_wide_image_stays_under_8000_px(tmp_path):
    from flux_mcp.media import make_preview

    wide = tmp_path / "wide.png"
    Image.new("RGB", (9000, 40), (10, 200, 30)).save(wide)
    data, mime = make_preview(wide, 500_000)
    import io

    with Image.open(io.BytesIO(data)) as im:
        assert max(im.size) <= 8000 and mime == "image/jpeg"


async def test_a_deleted_save_to_copy_is_rewritten_from_the_kept_image_with_its_provenance_once(settings, fake,
                                                                                              workspace):
    async with connect(settings, fake) as client:
        first = await client.call_tool("generate_image", {"prompt": "p", "save_to": "img/a.png"})
        target = workspace / "img" / "a.png"
        original = target.read_bytes()
        target.unlink()
        downloads = sum(r.startswith("GET /files/") for r in fake.requests)
        again = await client.call_tool("check_prediction", {"prediction_id": first.structured_content["prediction_id"]})
    assert again.structured_content["images"][0]["path"] == str(target)
    assert target.read_bytes() == original and original.count(b"iTXtprediction_id") == 1
    assert sum(r.startswith("GET /files/") for r in fake.requests) == downloads  # nothing fetched again


def test_written_files_are_complete_at_once_and_flushed_in_the_background(tmp_path):
    from flux_mcp.media import atomic_write, flush_pending

    files = {tmp_path / "deep" / f"f{i}.bin": os.urandom(1000 + i) for i in range(50)}
    for path, data in files.items():
        atomic_write(path, data, overwrite=False)
        assert path.read_bytes() == data  # complete the moment the call returns, before any flush
    assert flush_pending(timeout=30)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == sorted(p.name for p in files)
    with pytest.raises(PathNotAllowed):
        atomic_write(next(iter(files)), b"other", overwrite=False)
