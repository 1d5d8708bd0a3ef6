"""Where kept images live: the `ImageStore` protocol and the data-folder implementation.

Every finished image is kept by the server (provider URLs expire). The store decides where: the
folder store writes `FLUX_MCP_HOME/images/<provider>/<id>-<hash>-<n>.<ext>`, atomically; a shared
deployment stores objects in a bucket instead. Results name an image by the `location` its store
returned (for the folder store, an absolute local path; a result may name its `save_to` copy
instead, which the store reads too). Nothing outside a store builds those names.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import anyio

from .errors import PathNotAllowed

_EXTENSIONS = ("png", "jpg", "webp", "gif")
_OBJECT_NAME = re.compile(r"^(uploads|gallery)/[a-z0-9]{1,64}/[a-z0-9._-]{1,40}$")
"""Names of the small objects kept beside the images (upload links and their files, gallery logins)."""
_BIG = 256 * 1024
"""Writes larger than this go to a worker thread (a few hundred microseconds of disk work otherwise)."""


class ImageStore(Protocol):
    """The server's own copy of every finished image."""

    async def put(self, prediction_id: str, index: int, payload: bytes, ext: str) -> str:
        """Keeps `payload` as image `index` of the prediction (replacing an earlier copy); returns its location."""
        ...

    async def find(self, prediction_id: str, index: int) -> str | None:
        """The location of the kept copy of image `index`, or None when there is none."""
        ...

    async def read(self, location: str) -> bytes:
        """The bytes at `location` (raises FileNotFoundError when they are gone)."""
        ...

    async def present(self, location: str | None) -> bool:
        """Whether `location` still holds the image."""
        ...

    async def discard(self, location: str) -> bool:
        """Deletes `location` if it is one of this store's own copies (never a save_to copy); True if it went."""
        ...


class FolderStore:
    """Images as files under `<home>/images`."""

    def __init__(self, home: Path):
        self.root = home / "images"

    @staticmethod
    def relative_name(prediction_id: str, index: int, ext: str) -> str:
        """`<provider>/<id>-<hash8>-<n>.<ext>`: the same for every store, so a name is deterministic."""
        provider, _, native = prediction_id.partition(":")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", native)[:120] or "image"
        digest = hashlib.sha256(prediction_id.encode()).hexdigest()[:8]
        return f"{re.sub(r'[^a-z0-9_-]', '_', provider)}/{safe}-{digest}-{index}.{ext}"

    def _path(self, prediction_id: str, index: int, ext: str) -> Path:
        return self.root / self.relative_name(prediction_id, index, ext)

    @staticmethod
    def _local(location: str) -> Path:
        """A location as a path: the store's own files, or a save_to copy a result pointed at instead."""
        path = Path(location)
        if not path.is_absolute():
            raise FileNotFoundError(location)
        return path

    async def put(self, prediction_id: str, index: int, payload: bytes, ext: str) -> str:
        target = self._path(prediction_id, index, ext)
        if len(payload) > _BIG:
            await anyio.to_thread.run_sync(lambda: _atomic_write(target, payload))
        else:
            _atomic_write(target, payload)
        return str(target)

    async def find(self, prediction_id: str, index: int) -> str | None:
        for ext in _EXTENSIONS:
            path = self._path(prediction_id, index, ext)
            if path.is_file():
                return str(path)
        return None

    async def read(self, location: str) -> bytes:
        path = self._local(location)
        return await anyio.to_thread.run_sync(path.read_bytes)

    async def discard(self, location: str) -> bool:
        path = Path(location)
        try:
            if not path.resolve().is_relative_to(self.root.resolve()) or path.is_symlink():
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    async def present(self, location: str | None) -> bool:
        if not location:
            return False
        try:
            return self._local(location).is_file()
        except FileNotFoundError:
            return False

    # --- objects beside the images (upload links, gallery logins: see `uploads`) -----------------------

    def _object(self, name: str) -> Path:
        if not _OBJECT_NAME.match(name) or ".." in name:
            raise ValueError(f"not an object name: {name!r}")
        return self.root.parent / name

    async def put_object(self, name: str, payload: bytes, *, create: bool = False) -> bool:
        """Writes the object `name` (a relative name under FLUX_MCP_HOME); with `create`, only if no object of
        that name exists yet (atomically: of two writers one wins). True if this call wrote it."""
        target = self._object(name)

        def write() -> bool:
            from .media import atomic_write

            try:
                atomic_write(target, payload, overwrite=not create)
            except PathNotAllowed:  # `create` and the name is taken
                return False
            return True

        return await anyio.to_thread.run_sync(write)

    async def get_object(self, name: str) -> bytes | None:
        """The object's bytes (None: there is none)."""
        target = self._object(name)
        try:
            return await anyio.to_thread.run_sync(target.read_bytes)
        except FileNotFoundError:
            return None

def _atomic_write(target: Path, payload: bytes) -> None:
    from .media import atomic_write  # the download and image code, imported when the first image is kept

    atomic_write(target, payload, overwrite=True)
