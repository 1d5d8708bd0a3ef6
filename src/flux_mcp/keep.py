"""Keeping finished images: the server's own copy, the `save_to` copies, and a lost copy fetched anew.

`SaveTargets` decides (and checks, before anything is paid for) where each image of a job will be
written; `Keeper.keep` fetches every output (inline bytes, a download, or the copy already kept),
stores it with its provenance, and writes its `save_to` copy. A failed download or a full disk is
a problem note on the image — the job and its id are never lost for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from .errors import DownloadFailed, FluxError, InvalidInput, PathNotAllowed
from .images import Converted, light_work
from .media import (
    FORMATS,
    Downloader,
    ImageInfo,
    atomic_write,
    convert,
    decode_data_uri,
    embed_provenance,
    inspect_image,
)
from .models import ImageOutput
from .paths import PathPolicy, name_problem
from .providers.base import OutputRef
from .store import ImageStore


@dataclass
class Kept:
    """What keeping a job's outputs gave: one entry per output, in order."""

    images: list[ImageOutput] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    written: dict[str, bytes] = field(default_factory=dict)
    """The bytes now at each image's path (previews are made from them, not read back)."""
    notes: list[str] = field(default_factory=list)
    """What the images kept could not carry over (e.g. the frames of an animated image saved as PNG)."""


def save_targets(paths: PathPolicy, save_to: str | None, count: int, overwrite: bool, prompt: str) -> list[Path]:
    """Where each image will be written (checked before anything is paid for)."""
    if not save_to:
        return []
    raw = save_to.strip()
    paths.check_new_names(raw)
    is_folder = raw.endswith(("/", "\\")) or paths.absolute(raw).is_dir() or not Path(raw).suffix
    if is_folder:
        folder = paths.check_write(str(Path(raw) / "x.png")).parent
        stem = _slug(prompt)
        targets = [folder / f"{stem}{'' if i == 0 else f'-{i + 1}'}.png" for i in range(count)]
        if not overwrite:
            # In a folder the server picks the names, so it picks free ones.
            targets = [_free_name(t, taken=set(targets[:i])) for i, t in enumerate(targets)]
    else:
        first = paths.check_write(raw)
        ext = first.suffix.lower().lstrip(".")
        if ext not in FORMATS:
            raise InvalidInput(f"save_to must end in .png, .jpg, .jpeg or .webp (got {first.name!r}).")
        targets = [first if i == 0 else first.with_name(f"{first.stem}-{i + 1}{first.suffix}")
                   for i in range(count)]
    for t in targets:
        paths.check_write(str(t))
        if t.exists() and not overwrite:
            raise PathNotAllowed(f"{paths.display(t)} already exists. Pass overwrite=true to replace it, or "
                                 "choose another save_to.")
        if t.exists() and not t.is_file():
            raise PathNotAllowed(f"{t} exists and is not a regular file.")
    return targets


class Keeper:
    """Fetches, stores and copies the images of finished jobs."""

    def __init__(self, store: ImageStore, downloader: Downloader):
        self.store = store
        self.downloader = downloader

    async def keep(self, *, prediction_id: str, provenance: dict[str, str], base_url: str,
                   outputs: Sequence[OutputRef] | None, urls: Sequence[str | None], targets: Sequence[Path],
                   overwrite: bool, paths: PathPolicy, max_pixels: int | None = None) -> Kept:
        """Keeps every output. `outputs` is what the provider just answered (None: keep again from the
        copies already stored, else from `urls`, the URLs the journal holds). An image that would decode
        to more than `max_pixels` (`images.pixel_bound` of the size asked for) is refused unread."""
        host = urlsplit(base_url).hostname
        trusted = frozenset({host.lower()}) if host else frozenset()
        count = len(outputs) if outputs is not None else len(urls)
        slots: list[tuple[ImageOutput, str | None]] = [(ImageOutput(), None)] * count
        notes: list[list[str]] = [[] for _ in range(count)]
        kept = Kept()

        async def one(i: int) -> None:
            ref = outputs[i] if outputs is not None else None
            url = ref.url if ref else urls[i]
            stored = await self.store.find(prediction_id, i) if outputs is None else None
            target = targets[i] if i < len(targets) else None
            try:
                if ref and ref.data is not None:
                    data = ref.data
                elif stored is not None:
                    data = await self.store.read(stored)
                else:
                    data = await self._download(url, trusted)
                image, problem, written, notes[i] = await self._keep_one(
                    prediction_id, i, data, url, stored, target, paths, overwrite, provenance, max_pixels)
                slots[i] = (image, problem)
                if image.path and written is not None:
                    kept.written[image.path] = written
            except DownloadFailed as exc:
                slots[i] = (ImageOutput(url=url), f"image {i + 1}: {exc}")
            except OSError as exc:  # the disk, not the image: full, read-only, gone
                slots[i] = (ImageOutput(url=url), f"image {i + 1} could not be written to disk ({exc.strerror or exc})")

        if count == 1 or (outputs is not None and all(o.data is not None for o in outputs)):
            for i in range(count):  # nothing to download: no concurrency to gain
                await one(i)
        else:
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(one, i)
        kept.images = [image for image, _ in slots]
        kept.problems = [problem for _, problem in slots if problem]
        kept.notes = [f"image {i + 1}: {note}" for i, image_notes in enumerate(notes) for note in image_notes]
        return kept

    async def _keep_one(self, prediction_id: str, i: int, data: bytes, url: str | None, stored: str | None,
                        target: Path | None, paths: PathPolicy, overwrite: bool, provenance: dict[str, str],
                        max_pixels: int | None) -> tuple[ImageOutput, str | None, bytes | None, list[str]]:
        """Checks one image, stores it and writes its save_to copy. Returns the image, a problem with its
        save_to copy if any, the bytes now at the image's path, and notes on what its copy could not keep."""
        work = functools.partial(_prepare, data, stored is None, max_pixels)
        if stored is None and light_work(data, target.suffix.lstrip(".") if target else None):
            info, payload = work(provenance)
        else:
            # Decoding, re-encoding or much data: CPU work kept off the event loop.
            info, payload = await anyio.to_thread.run_sync(work, provenance)
        if stored is None:
            location, written = await self.store.put(prediction_id, i, payload, info.ext), payload
        else:
            location, written = stored, data
        mime, problem, notes = info.mime_type, None, []
        if target is not None:
            try:
                copy = functools.partial(_save_copy, target, data, info, provenance, paths, overwrite,
                                         labelled=stored is not None)
                saved, mime, converted = (copy() if light_work(data, target.suffix.lstrip("."))
                                          else await anyio.to_thread.run_sync(copy))
                location, written, notes = str(saved), converted.data, converted.notes  # the copy asked for
            except FluxError as exc:
                problem = f"image {i + 1} was not written to {target}: {exc}"
        image = ImageOutput(url=url, path=location, mime_type=mime, width=info.width, height=info.height)
        return image, problem, written, notes

    async def _download(self, url: str | None, trusted: frozenset[str]) -> bytes:
        if not url:
            raise DownloadFailed("the provider gave neither a URL nor the image data")
        if url.startswith("data:"):
            return decode_data_uri(url)
        return await self.downloader.fetch(url, trusted)


def _prepare(data: bytes, fresh: bool, max_pixels: int | None, provenance: dict[str, str]
             ) -> tuple[ImageInfo, bytes]:
    """Inspects the image and, when it is new, labels it with its provenance (no re-encoding)."""
    info = inspect_image(data, max_pixels)
    return info, (embed_provenance(data, info, provenance) if fresh else data)


def _save_copy(target: Path, data: bytes, info: ImageInfo, provenance: dict[str, str], paths: PathPolicy,
               overwrite: bool, *, labelled: bool = False) -> tuple[Path, str, Converted]:
    checked = paths.check_write(str(target))
    ext = checked.suffix.lower().lstrip(".") or "png"
    converted = convert(data, info, ext, provenance, labelled=labelled)
    atomic_write(checked, converted.data, overwrite=overwrite)
    return checked, FORMATS[ext][1], converted


def _slug(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())[:6]
    slug = "-".join(words)[:60] or "image"
    return slug if name_problem(f"{slug}.png") is None else f"{slug}-image"  # a prompt "con" names no device


def _free_name(target: Path, taken: set[Path]) -> Path:
    candidate, n = target, 2
    while candidate.exists() or candidate in taken:
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return candidate
