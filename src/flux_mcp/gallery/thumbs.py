"""Thumbnails of kept images, made server-side with Pillow and cached in memory."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import anyio

from ..journal import Record
from ..store import ImageStore

SIDE = 512
"""Longest side of a thumbnail: sharp in a grid of ~256 px cards on a 2x display."""
CACHE_BYTES = 48 * 1024 * 1024
"""Thumbnails kept in memory (about a thousand); the least recently shown go first."""


def make_thumbnail(data: bytes, side: int = SIDE) -> bytes:
    """A WebP no larger than `side` px a side (keeps transparency); the decoding is Pillow's, so the
    pixel limit the server sets for every image applies."""
    from PIL import Image

    from ..images import inspect_image  # sets Pillow's decompression-bomb limit before anything is decoded

    inspect_image(data)
    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (side, side))  # JPEG: decode at a reduced scale, far faster for big photos
        opened.load()
        opened.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)  # shrink fast, then finely
        im: Image.Image = opened
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
        out = io.BytesIO()
        im.save(out, "WEBP", quality=80, method=4)
        return out.getvalue()


class Thumbnails:
    """Makes and caches thumbnails of the images a journal record names (read through the image store, so
    only images the journal points at are ever read)."""

    def __init__(self, store: ImageStore, *, side: int = SIDE, max_bytes: int = CACHE_BYTES):
        self.store = store
        self.side = side
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple[str, int, str, float], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    async def get(self, record: Record, index: int) -> bytes | None:
        """The thumbnail of image `index` of `record`; None when the record has no such image on disk."""
        if not 0 <= index < len(record.images) or not record.images[index].path:
            return None
        path = str(record.images[index].path)
        key = (record.id, index, path, record.updated_at)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            data = await self.store.read(path)
        except OSError:
            return None
        try:
            thumb = await anyio.to_thread.run_sync(make_thumbnail, data, self.side)
        except Exception:  # noqa: BLE001 - a file that no longer decodes has no thumbnail
            return None
        with self._lock:
            self._cache[key] = thumb
            self._size += len(thumb)
            while self._size > self.max_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._size -= len(old)
        return thumb
