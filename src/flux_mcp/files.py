"""Durable file writes: a temp file and a rename (never a partial file), fsyncs batched on one background
thread, and the sweeps of temp files a killed process left behind.

Apart from the download and image code (`media`) because a server's start sweeps its data folder: that must
not import an HTTP client and Pillow.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path

from .errors import PathNotAllowed

log = logging.getLogger("flux_mcp.media")


def atomic_write(target: Path, data: bytes, *, overwrite: bool) -> None:
    """Writes via a temp file in the same folder and a rename, so no partial file is ever left.

    The complete file is in place when this returns (a crash of this process cannot lose or truncate
    it); the flush to stable storage (fsync of the file and its folder) follows on a background
    thread, milliseconds later, so the caller does not wait for the disk — the same bargain as the
    journal's WAL with synchronous=NORMAL. `flush_pending()` waits for it (the server does at exit).

    The temp file (`.flux-<random>.part`) exists only while this runs: a stopping server removes the
    ones of writes still under way (`remove_temp_files`), and those a killed process left behind are
    swept later (`sweep_stale_temp_files`).
    """
    tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
    try:
        fd = _TEMPS.create(tmp)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _TEMPS.create(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target exists: never overwrites by accident
            except FileExistsError:
                raise PathNotAllowed(
                    f"{target} already exists; pass overwrite=true or choose another file name."
                ) from None
            except OSError:
                if target.exists():
                    raise PathNotAllowed(f"{target} already exists; choose another file name.") from None
                os.replace(tmp, target)
            else:
                with contextlib.suppress(FileNotFoundError):  # removed by a stop meanwhile: the target is whole
                    os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _TEMPS.done(tmp)
    _FLUSHER.add(target)


TEMP_PREFIX, TEMP_SUFFIX = ".flux-", ".part"
"""How atomic_write names its temp files (hidden, and recognisable by the sweeps below)."""
STALE_IN_DATA_FOLDER = 300.0
"""A temp file in the data folder older than this (seconds) was left by a process that died mid-write."""
STALE_NEXT_TO_SAVE_TO = 3600.0
"""...and in a user's save_to folder, where another program's writes are none of ours to judge quickly."""


class _TempFiles:
    """The temp files atomic_write has open in this process, so a stopping server can remove them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[Path] = set()

    def create(self, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        with self._lock:  # created and registered as one step: a stop cannot slip in between
            fd = os.open(tmp, flags, 0o666)  # the umask applies: images are ordinary user files
            self._paths.add(tmp)
        return fd

    def done(self, tmp: Path) -> None:
        with self._lock:
            self._paths.discard(tmp)

    def remove_all(self) -> int:
        with self._lock:
            paths, self._paths = self._paths, set()
        removed = 0
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        return removed


_TEMPS = _TempFiles()


def remove_temp_files() -> int:
    """Removes the temp files of writes still under way in this process (a stopping server's last step);
    returns how many. Those writes then fail; the files they were writing never appear half-written."""
    return _TEMPS.remove_all()


def sweep_stale_temp_files(folder: Path, older_than: float, *, recursive: bool = False) -> int:
    """Removes atomic_write temp files in `folder` (and, with `recursive`, its subfolders) last modified more
    than `older_than` seconds ago: left by a process killed mid-write. Returns how many were removed."""
    cutoff = time.time() - older_than
    removed = 0
    pending = [folder]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # missing or unreadable: nothing of ours to sweep there
        for entry in entries:
            try:
                if recursive and entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)
                      and entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed += 1
            except OSError as exc:
                log.debug("temp file sweep, %s: %s", entry.path, exc)
    if removed:
        log.info("removed %d stale temp file(s) in %s", removed, folder)
    return removed


_SWEPT: set[Path] = set()


def sweep_save_folder_once(folder: Path) -> None:
    """Sweeps a save_to folder of stale temp files, the first time this process writes into it."""
    if folder in _SWEPT:
        return
    if len(_SWEPT) > 1024:
        _SWEPT.clear()
    _SWEPT.add(folder)
    sweep_stale_temp_files(folder, STALE_NEXT_TO_SAVE_TO)


_COALESCE_SECONDS = 0.05
"""The flusher waits this long after a write before flushing, so a burst's files share their folders' fsync."""


class _Flusher:
    """One background thread that fsyncs written files and their folders, in batches."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Path | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="flux-mcp-fsync", daemon=True)
                self._thread.start()
        self._queue.put(path)

    def wait(self, timeout: float = 30.0) -> bool:
        """Blocks until everything queued so far is on stable storage (False on timeout)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            time.sleep(_COALESCE_SECONDS)  # let a burst of writes gather: its folder is flushed once
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            files = list(dict.fromkeys(item for item in batch if isinstance(item, Path)))
            folders = list(dict.fromkeys(path.parent for path in files))
            for path, flags in [*((f, os.O_RDONLY) for f in files),
                                *((d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) for d in folders)]:
                try:
                    fd = os.open(path, flags)
                except OSError:
                    continue  # replaced or removed meanwhile: nothing of ours left to flush
                try:
                    os.fsync(fd)
                except OSError as exc:  # e.g. a folder on a filesystem that cannot fsync directories
                    log.debug("fsync %s: %s", path, exc)
                finally:
                    os.close(fd)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()


_FLUSHER = _Flusher()


def flush_pending(timeout: float = 30.0) -> bool:
    """Waits until every file written so far is on stable storage."""
    return _FLUSHER.wait(timeout)


atexit.register(flush_pending)
