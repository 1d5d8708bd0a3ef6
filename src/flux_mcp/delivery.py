"""The pixel work of a planned delivery: exact size, matte, a preset's files, before/after previews.

`deliver` is CPU work (run it on a worker thread); `write_files` puts the files it made in place,
each atomically, never replacing a file unless asked (a file that already holds exactly these bytes
counts as written: the same job kept twice). Pillow and numpy are imported on first use.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from . import matte
from .assets import ORIGINAL_INDEX, AssetPlan, unmatted_path
from .errors import FluxError, PathNotAllowed
from .images import FORMATS, PREVIEW_START_SIDE, embed_provenance, inspect_image
from .media import atomic_write
from .paths import PathPolicy
from .presets import OutFile, snippet
from .store import ImageStore

if TYPE_CHECKING:
    from PIL.Image import Image

_BACKDROP = (238, 238, 238)
"""What transparent parts show on in a preview (flat: a pattern would look like a fake transparency)."""


@dataclass
class Delivery:
    """One image as delivered, and what goes with it."""

    image: bytes
    """The image the result points at: exact size, matted (the unmatted one when the matte failed)."""
    original: bytes | None = None
    """A transparent image's unmatted original (exact size, on its key background)."""
    files: list[tuple[str, bytes]] = field(default_factory=list)
    """A preset's files: name under the folder, bytes."""
    notes: list[str] = field(default_factory=list)
    failure: str | None = None
    """Why the matte failed (then no transparent image is delivered)."""


def deliver(data: bytes, asset: AssetPlan, provenance: dict[str, str]) -> Delivery:
    """Crops and resizes `data` to the exact size, mattes it and cuts the preset's files from it."""
    from PIL import Image as PILImage

    inspect_image(data)  # the limits (format, pixels) before decoding
    with PILImage.open(io.BytesIO(data)) as opened:
        opened.load()
        im = opened.convert("RGBA" if _has_alpha(opened) else "RGB")
        source_format = opened.format
    notes: list[str] = []
    made = fit(im, asset.target)
    if made is not im:
        w, h = im.size
        how = "cropped and resized" if abs(w / h - asset.target[0] / asset.target[1]) > 0.002 else "resized"
        up = " (upscaled: the provider returned a smaller image)" if w < asset.target[0] or h < asset.target[1] \
            else ""
        notes.append(f"generated at {w}x{h}, {how} to exactly {asset.target[0]}x{asset.target[1]}{up}")
    out = Delivery(image=b"")
    if asset.key:
        keyed = made.convert("RGB")
        result = matte.matte(keyed, asset.key, allow_checkers=asset.checkers)
        out.original = _encode(keyed, "png", provenance)
        if result.failure:
            out.failure = result.failure
            made = keyed
        else:
            made = result.image
            notes.append(f"transparent background matted and verified (the subject covers {result.coverage:.0%} "
                         "of the frame)")
    out.notes = notes
    preset = asset.preset_info
    if preset is not None and out.failure is None:
        out.files = [(f.name, _file(made, f, provenance)) for f in preset.files]
    if made is im and not asset.key:
        out.image = data  # delivered as it came: no re-encoding
    else:
        fmt = "png" if made.mode == "RGBA" or source_format not in ("JPEG", "WEBP") else \
            {"JPEG": "jpg", "WEBP": "webp"}[source_format]
        out.image = _encode(made, fmt, {})  # labelled when it is stored, like every image
    return out


def fit(im: Image, target: tuple[int, int]) -> Image:
    """`im` cropped (centred, to the target's shape) and resized to exactly `target`; `im` itself if it is."""
    from PIL import Image as PILImage

    if im.size == target:
        return im
    w, h = im.size
    tw, th = target
    scale = max(tw / w, th / h)
    cw, ch = tw / scale, th / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    return im.resize(target, PILImage.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))


def _has_alpha(im: Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _file(master: Image, f: OutFile, provenance: dict[str, str]) -> bytes:
    from PIL import Image as PILImage

    if f.format == "ico":
        buf = io.BytesIO()
        master.save(buf, "ICO", sizes=[(s, s) for s in f.ico_sizes])
        return buf.getvalue()
    im = fit(master, (f.width, f.height))
    if f.opaque and im.mode == "RGBA":
        flat = PILImage.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        im = flat
    return _encode(im, f.format, provenance)


def _encode(im: Image, fmt: str, provenance: dict[str, str]) -> bytes:
    from .provenance import xmp_packet

    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", compress_level=6)
        data = buf.getvalue()
        return embed_provenance(data, inspect_image(data), provenance)
    rgb = im.convert("RGB") if fmt in ("jpg", "jpeg") and im.mode != "RGB" else im
    if fmt in ("jpg", "jpeg"):
        rgb.save(buf, "JPEG", quality=88, optimize=True, progressive=True)
        data = buf.getvalue()
        return embed_provenance(data, inspect_image(data), provenance)
    if fmt == "webp":
        rgb.save(buf, "WEBP", quality=85, method=4, xmp=xmp_packet(provenance))
    elif fmt == "avif":
        rgb.save(buf, "AVIF", quality=60, speed=8, xmp=xmp_packet(provenance))  # default speed: 4x slower
    else:
        raise ValueError(f"no encoder for {fmt}")
    return buf.getvalue()


# --- writing the files ----------------------------------------------------------------------------


async def write_files(made: Delivery, asset: AssetPlan, target: Path | None, paths: PathPolicy, overwrite: bool,
                      free_names: bool, store: ImageStore, prediction_id: str, index: int,
                      into: dict[str, Any]) -> tuple[tuple[str, bytes, str] | None, str | None]:
    """Writes what goes with image `index` (a preset's files, a transparent image's unmatted original)
    and records it in `into` (merged into the journaled request). `target` is the image's save_to copy
    as written (or as planned, when the matte failed and it was not written). Returns where the result
    should point instead (location, its bytes, their MIME type; None: where it points) and a problem."""
    files: list[str] = into.setdefault("asset_files", [])
    notes: list[str] = into.setdefault("asset_notes", [])
    failures: list[str] = into.setdefault("asset_failures", [])
    notes.extend(n for n in made.notes if n not in notes)
    moved: tuple[str, bytes, str] | None = None
    problems: list[str] = []
    which = f"image {index + 1}: " if index else ""
    if made.original is not None:
        kept = await store.put(prediction_id, ORIGINAL_INDEX + index, made.original, "png")
        if target is not None:
            try:
                written = await anyio.to_thread.run_sync(
                    _write, paths, unmatted_path(target), made.original, overwrite, free_names)
                files.append(paths.display(written))
                kept = str(written)
            except (FluxError, OSError) as exc:
                problems.append(f"{which}the unmatted original was not written beside {target.name} ({exc})")
        elif not made.failure and asset.preset is None:
            files.append(kept)
        if made.failure:
            moved = (kept, made.original, "image/png")
            not_written = f" {paths.display(target)} was not written;" if target is not None else ""
            failures.append(f"{which}The transparent matte FAILED verification: {made.failure}.{not_written} the "
                            f"unmatted image is {paths.display(kept)}. Call again for a new image (another seed), "
                            "or ask for a simpler subject.")
    preset = asset.preset_info
    if preset is not None and made.files and asset.folder:
        folder = Path(asset.folder)

        def write_all() -> list[str]:
            return [paths.display(_write(paths, folder / name, data, overwrite, False)) for name, data in made.files]

        try:
            written_files = await anyio.to_thread.run_sync(write_all)
            files.extend(f for f in written_files if f not in files)
            main = dict(made.files)[preset.main]
            moved = (str(folder / preset.main), main, FORMATS[Path(preset.main).suffix.lstrip(".")][1])
            into["asset_snippet"] = snippet(preset)
        except (FluxError, OSError) as exc:
            problems.append(f"the {preset.id} files were not all written to {paths.display(folder)} ({exc})")
    return moved, "; ".join(problems) or None


def _write(paths: PathPolicy, target: Path, payload: bytes, overwrite: bool, free_names: bool) -> Path:
    candidate = paths.check_write(str(target))
    for n in range(2, 1002):
        if _holds(candidate, payload):
            return candidate
        try:
            atomic_write(candidate, payload, overwrite=overwrite)
            return candidate
        except PathNotAllowed:
            if not free_names:
                raise
        candidate = paths.check_write(str(target.with_name(f"{target.stem}-{n}{target.suffix}")))
    raise PathNotAllowed(f"no free file name next to {target}")


def _holds(path: Path, payload: bytes) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == len(payload) and \
            path.read_bytes() == payload
    except OSError:
        return False


async def original_for_rekeep(store: ImageStore, prediction_id: str, index: int, asset: AssetPlan | None,
                              data: bytes, stored: str | None) -> tuple[bytes, str | None]:
    """Keeping a finished job again from the store: a transparent image is delivered again from its
    unmatted original (so its files and matte are made anew); anything else from the copy kept."""
    if stored is None or asset is None or not asset.key:
        return data, stored
    original = await store.find(prediction_id, ORIGINAL_INDEX + index)
    if original is None:
        return data, stored
    return await store.read(original), None


# --- before/after -------------------------------------------------------------------------------


def before_after(source: bytes, result: bytes, budget: int | None) -> tuple[bytes, str]:
    """One JPEG: the edit's input (left) and its result (right), the same height, within `budget` bytes."""
    from PIL import Image as PILImage

    sides = []
    for data in (source, result):
        inspect_image(data)
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            sides.append(_flat(im))
    height = min(max(s.height for s in sides), PREVIEW_START_SIDE)
    scaled = [s.resize((max(1, round(s.width * height / s.height)), height), PILImage.Resampling.LANCZOS)
              for s in sides]
    gap = max(4, height // 64)
    canvas = PILImage.new("RGB", (scaled[0].width + gap + scaled[1].width, height), (255, 255, 255))
    canvas.paste(scaled[0], (0, 0))
    canvas.paste(scaled[1], (scaled[0].width + gap, 0))
    return _jpeg_within(canvas, budget), "image/jpeg"


def _flat(im: Image) -> Image:
    from PIL import Image as PILImage

    if _has_alpha(im):
        rgba = im.convert("RGBA")
        flat = PILImage.new("RGB", rgba.size, _BACKDROP)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def _jpeg_within(im: Image, budget: int | None) -> bytes:
    from PIL import Image as PILImage

    side, quality = min(max(im.size), 2 * PREVIEW_START_SIDE), 85
    while True:
        scaled = im.copy()
        scaled.thumbnail((side, side), PILImage.Resampling.LANCZOS)
        buf = io.BytesIO()
        scaled.save(buf, "JPEG", quality=quality, optimize=True)
        if budget is None or buf.tell() <= budget or side <= 96:
            return buf.getvalue()
        if quality > 70:
            quality -= 10
        else:
            side = int(side * 0.75)
