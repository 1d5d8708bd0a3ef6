"""Keeping finished images: the server's own copy, the `save_to` copies, and a lost copy fetched anew.

`SaveTargets` decides (and checks, before anything is paid for) where each image of a job will be
written; `Keeper.keep` fetches every output (inline bytes, a download, or the copy already kept),
stores it with its provenance, and writes its `save_to` copy. A failed download or a full disk is
a problem note on the image — the job and its id are never lost for it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from . import delivery
from .assets import AssetPlan
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
    sweep_save_folder_once,
)
from .models import ImageOutput
from .paths import PathPolicy, name_problem
from .providers.base import OutputRef
from .store import ImageStore

log = logging.getLogger("flux_mcp.keep")


@dataclass
class Kept:
    """What keeping a job's outputs gave: one entry per output, in order."""

    images: list[ImageOutput] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    written: dict[str, bytes] = field(default_factory=dict)
    """The bytes now at each image's path (previews are made from them, not read back)."""
    notes: list[str] = field(default_factory=list)
    """What the images kept could not carry over (e.g. the frames of an animated image saved as PNG)."""
    delivery: dict[str, object] = field(default_factory=dict)
    """What a planned delivery wrote besides the images (files, notes): merged into the journaled request."""


@dataclass(frozen=True)
class SavePlan:
    """Where a job's images go besides the data folder, as decided (and checked) before paying."""

    targets: tuple[Path, ...] = ()
    free_names: bool = False
    """A folder was asked for: the server names the files, so a name taken meanwhile moves to the next
    free one at write time (`-2`, `-3`, ...) instead of failing."""
    root: Path | None = None
    """The allowed folder of the call that asked: the copies are written inside it whichever server, in
    whichever workspace, finishes the job."""
    asset: AssetPlan | None = None
    """Exact size, transparency, preset files: how the images are delivered (assets.plan)."""

    def journaled(self) -> dict[str, object]:
        return {"save_to": [str(t) for t in self.targets] or None, "save_free": self.free_names,
                "save_root": str(self.root) if self.root else None,
                **(self.asset.journaled() if self.asset else {})}

    @classmethod
    def from_journal(cls, request: dict[str, object]) -> SavePlan:
        raw = request.get("save_to") or []
        root = request.get("save_root")
        return cls(tuple(Path(str(t)) for t in raw) if isinstance(raw, list) else (),
                   bool(request.get("save_free")), Path(root) if isinstance(root, str) else None,
                   AssetPlan.from_journal(request))


PATH_MAX = 4096
"""Bytes in a whole path on Linux; longer ones fail at write time, after paying."""


def save_targets(paths: PathPolicy, save_to: str | None, count: int, overwrite: bool, prompt: str) -> SavePlan:
    """Where each image will be written, with every check that can be made before anything is paid for:
    inside the allowed folders, a parent that is (or can become) a folder, names the file system takes,
    no existing file replaced unless `overwrite`."""
    if not save_to:
        return SavePlan()
    raw = save_to.strip()
    paths.check_new_names(raw)  # names unsafe on some system, or too long: before any look at the disk
    _check_length(paths.absolute(raw))
    is_folder = raw.endswith(("/", "\\")) or paths.absolute(raw).is_dir() or not Path(raw).suffix
    if is_folder:
        folder = paths.check_write(str(Path(raw) / "x.png")).parent
        stem = _slug(prompt)
        targets = [folder / f"{stem}{'' if i == 0 else f'-{i + 1}'}.png" for i in range(count)]
        if not overwrite:
            # In a folder the server picks the names, so it picks free ones (again at write time).
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
        _check_parent(t, paths)
        _check_length(t)
        if t.exists() and not t.is_file():
            raise PathNotAllowed(f"{paths.display(t)} exists and is not a regular file; choose another save_to.")
        if t.exists() and not overwrite and not is_folder:
            raise PathNotAllowed(f"{paths.display(t)} already exists. Pass overwrite=true to replace it, or "
                                 "choose another save_to.")
    root = next((f for f in paths.folders if targets and targets[0].is_relative_to(f)), None)
    return SavePlan(tuple(targets), is_folder and not overwrite, root)


def _check_parent(target: Path, paths: PathPolicy) -> None:
    """The nearest existing ancestor of the target's folder must be a folder (a file there would fail the
    write only after paying)."""
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PathNotAllowed(f"save_to cannot be written: {paths.display(probe)} is a file, not a folder. Choose "
                             "another save_to.")


def _check_length(target: Path) -> None:
    """The whole path (each name is checked by `PathPolicy.check_new_names`)."""
    if len(str(target).encode()) > PATH_MAX:
        raise InvalidInput(f"save_to is over {PATH_MAX} bytes as an absolute path; choose a shorter one.")


class Keeper:
    """Fetches, stores and copies the images of finished jobs."""

    def __init__(self, store: ImageStore, downloader: Downloader):
        self.store = store
        self.downloader = downloader

    async def keep(self, *, prediction_id: str, provenance: dict[str, str], base_url: str,
                   outputs: Sequence[OutputRef] | None, urls: Sequence[str | None], plan: SavePlan,
                   overwrite: bool, paths: PathPolicy, max_pixels: int | None = None) -> Kept:
        """Keeps every output. `outputs` is what the provider just answered (None: keep again from the
        copies already stored, else from `urls`, the URLs the journal holds). The save_to copies are
        written inside the folder of the call that asked for them (`plan.root`), else by `paths`. An image
        that would decode to more than `max_pixels` (`images.pixel_bound` of the size asked for) is refused
        unread."""
        targets = plan.targets
        if plan.root is not None:
            paths = PathPolicy([plan.root], paths.home)
        trusted = frozenset({base_url})  # the provider's own origin (scheme, host and port), not just its host
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
                data, stored = await delivery.original_for_rekeep(self.store, prediction_id, i, plan.asset, data,
                                                                  stored)
                image, problem, written, notes[i] = await self._keep_one(
                    prediction_id, i, data, url, stored, target, paths, overwrite, plan.free_names, provenance,
                    max_pixels, plan.asset, kept.delivery)
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
                        target: Path | None, paths: PathPolicy, overwrite: bool, free_names: bool,
                        provenance: dict[str, str], max_pixels: int | None, asset: AssetPlan | None = None,
                        delivered: dict[str, object] | None = None
                        ) -> tuple[ImageOutput, str | None, bytes | None, list[str]]:
        """Checks one image, stores it and writes its save_to copy. Returns the image (pointing at the
        save_to copy, or at the stored copy when that could not be written), a problem with the save_to
        copy if any, the bytes now at the image's path, and notes on what its copy could not keep. With an
        `asset` plan the image is delivered as planned first (exact size, matte, a preset's files: the
        `delivery` module)."""
        made, planned, undelivered = None, target, None
        if asset is not None and (stored is None or asset.preset):
            try:
                made = await anyio.to_thread.run_sync(delivery.deliver, data, asset, provenance)
                data, target = made.image, None if made.failure else target
            except (DownloadFailed, OSError):
                raise
            except Exception as exc:
                log.exception("delivering image %d of %s as planned", i + 1, prediction_id)
                undelivered = f"image {i + 1} is kept as the provider made it: {type(exc).__name__} in the " \
                              "planned delivery (size, matte or files)"
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
                                         free_names, labelled=stored is not None)
                saved, mime, converted = (copy() if light_work(data, target.suffix.lstrip("."))
                                          else await anyio.to_thread.run_sync(copy))
                location, written, notes = str(saved), converted.data, converted.notes  # the copy asked for
            except (FluxError, OSError, ValueError) as exc:
                # The image is kept and paid for: its stored copy is the result; the copy's failure is a note.
                mime = info.mime_type
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                problem = f"image {i + 1} was not written to {target} ({why}); it is kept at {location}"
        if made is not None and asset is not None:
            moved, extra = await delivery.write_files(
                made, asset, Path(location) if target is not None and problem is None else planned, paths,
                overwrite, free_names, self.store, prediction_id, i, {} if delivered is None else delivered)
            if moved is not None:
                location, written, mime = moved
            problem = "; ".join(filter(None, [problem, extra])) or None
        problem = "; ".join(filter(None, [problem, undelivered])) or None
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
               overwrite: bool, free_names: bool, *, labelled: bool = False) -> tuple[Path, str, Converted]:
    """Writes one save_to copy. The final name is taken atomically at write time: a file that already
    holds exactly this image counts as written (another server finished the same job, or a check
    repeated the write); with `free_names` a name taken meanwhile moves on to the next free one."""
    checked = paths.check_write(str(target))
    ext = checked.suffix.lower().lstrip(".") or "png"
    converted = convert(data, info, ext, provenance, labelled=labelled)
    payload = converted.data
    candidate = checked
    for n in range(2, 1002):
        if not overwrite and _holds(candidate, payload):
            return candidate, FORMATS[ext][1], converted
        try:
            atomic_write(candidate, payload, overwrite=overwrite)
            sweep_save_folder_once(candidate.parent)  # temp files a killed process left beside the user's files
            return candidate, FORMATS[ext][1], converted
        except PathNotAllowed:
            if not free_names or not candidate.exists():
                raise
        candidate = paths.check_write(str(checked.with_name(f"{checked.stem}-{n}{checked.suffix}")))
    raise PathNotAllowed(f"no free file name next to {checked}; choose another save_to.")


def _holds(path: Path, payload: bytes) -> bool:
    """Whether `path` is a regular file whose bytes are exactly `payload`."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size != len(payload):
            return False
        return path.read_bytes() == payload
    except OSError:
        return False



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
