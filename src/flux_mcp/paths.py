"""Which local files the tools may read and write, decided after resolving symlinks, and which new
file names are safe on every system a project travels to."""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .errors import PathNotAllowed

MAX_INPUT_BYTES = 50 * 1024 * 1024
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
MAX_NAME_BYTES = 255
"""The longest file name (one path component, UTF-8) ext4, APFS and NTFS all accept."""
_WINDOWS_FORBIDDEN = set('<>:"|?*\\')
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"0123456789", "\u00b9", "\u00b2", "\u00b3"]})
_JOINERS = frozenset("\u200c\u200d")
"""Zero-width (non-)joiners: invisible, but part of how emoji sequences and several scripts are written."""
_ONLY_EXTENSION = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})


def name_problem(name: str) -> str | None:
    """Why `name` (one path component) is unsafe as a new file or folder name on Linux, macOS or
    Windows, as a sentence that says what to do; None when it is safe everywhere."""
    if name in (".", ".."):
        return None
    if name.lower() in _ONLY_EXTENSION:
        return (f"{name!r} is only an extension, which would become a hidden file or a folder: name the file "
                f"(e.g. 'hero{name.lower()}'), or give a folder ending in '/'")
    forbidden = sorted({ch for ch in name if ch in _WINDOWS_FORBIDDEN})
    if forbidden:
        what = "a drive letter or stream name (':')" if forbidden == [":"] else " ".join(repr(c) for c in forbidden)
        return f"{name!r} contains {what}, which Windows does not allow in file names"
    hidden = [ch for ch in name if _invisible(ch)]
    if hidden:
        names = ", ".join(sorted({f"U+{ord(ch):04X} {unicodedata.name(ch, 'control character')}" for ch in hidden}))
        return f"the name contains invisible formatting characters ({names}), which can disguise what a file is"
    if name.endswith((".", " ")):
        return f"{name!r} ends with a dot or a space, which Windows drops (the file would get another name there)"
    if name.split(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        return f"{name!r} is a reserved device name on Windows ({name.split('.')[0].upper()}), not a file name there"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"a name of {size} bytes is over the {MAX_NAME_BYTES} that file systems allow"
    return None


def _invisible(ch: str) -> bool:
    """Bidirectional overrides, other format characters, controls and lone surrogates."""
    category = unicodedata.category(ch)
    return (category == "Cf" and ch not in _JOINERS) or category in ("Cc", "Cs")


def usable_folders(candidates: Sequence[Path], home: Path) -> list[Path]:
    """The allowed folders: candidates that exist and are neither the filesystem root nor the home folder.

    Clients often start servers in `/` or `~`; allowing those would open every file of the user, so
    such a folder is dropped (the data folder stays allowed), until FLUX_MCP_ALLOWED_DIRS is set.
    """
    user_home = Path.home().resolve()
    out: list[Path] = []
    for c in candidates:
        try:
            r = c.expanduser().resolve()
        except OSError:
            continue
        if r == Path(r.anchor) or r == user_home or not r.is_dir():
            continue
        if r not in out:
            out.append(r)
    return out


def to_local_path(raw: str) -> Path:
    """Turns a user-given path (POSIX, `~`, `file://`, or a Windows drive path) into a Path."""
    text = raw.strip()
    if "\x00" in text or any(ord(ch) < 32 for ch in text):
        raise PathNotAllowed("The path contains control characters; give a plain file path.")
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(text)
        text = unquote(parsed.path)
        if os.name == "nt" and text.startswith("/") and _WINDOWS_DRIVE.match(text[1:]):
            text = text[1:]
    if os.name != "nt":
        if _WINDOWS_DRIVE.match(text) or text.startswith("\\\\"):
            raise PathNotAllowed(
                f"{raw!r} is a Windows path, but this server runs on {os.uname().sysname}: give a path inside "
                "the allowed folders, or a path relative to the project."
            )
        # A client on Windows may send relative paths with backslashes.
        text = text.replace("\\", "/")
    return Path(text).expanduser()


class PathPolicy:
    """Checks reads and writes against the allowed folders (plus the data folder for its own files)."""

    def __init__(self, folders: Sequence[Path], home: Path):
        self.folders = list(folders)
        self.home = home.resolve()

    @property
    def base(self) -> Path:
        """Where relative paths resolve: the first allowed folder, else the data folder."""
        return self.folders[0] if self.folders else self.home

    def _roots(self) -> list[Path]:
        return [*self.folders, self.home]

    def _inside(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self._roots())

    def describe(self) -> str:
        return ", ".join(str(p) for p in self._roots())

    def absolute(self, raw: str) -> Path:
        path = to_local_path(raw)
        return path if path.is_absolute() else self.base / path

    def check_read(self, raw: str) -> Path:
        """The resolved path of an existing regular file inside the allowed folders."""
        path = self.absolute(raw)
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise PathNotAllowed(f"No such file: {path}. Give a path inside {self.describe()}.") from None
        if not self._inside(resolved):
            raise PathNotAllowed(
                f"{path} is outside the allowed folders ({self.describe()}). Move the file there, or add its "
                "folder to FLUX_MCP_ALLOWED_DIRS."
            )
        if str(resolved).startswith(("/proc/", "/sys/", "/dev/")):
            raise PathNotAllowed(f"{path} is a system file, not an image.")
        st = resolved.stat()
        if not stat.S_ISREG(st.st_mode):
            raise PathNotAllowed(f"{path} is not a regular file.")
        return resolved

    def read_bytes(self, raw: str, limit: int = MAX_INPUT_BYTES) -> tuple[Path, bytes]:
        """Reads an allowed file, checking its size on the opened file (no swap between check and read)."""
        resolved = self.check_read(raw)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(resolved, flags)
        except OSError as exc:
            raise PathNotAllowed(f"Cannot open {resolved}: {exc.strerror}.") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PathNotAllowed(f"{resolved} is not a regular file.")
            if st.st_size > limit:
                raise PathNotAllowed(f"{resolved} is {st.st_size} bytes; the limit is {limit} bytes.")
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise PathNotAllowed(f"{resolved} is over the {limit}-byte limit.")
        return resolved, data

    def check_new_names(self, raw: str) -> None:
        """Refuses a write target whose new names (the file's, and those of folders still to be created)
        are unsafe on any of Linux, macOS and Windows; folders that already exist are the user's own."""
        path = self.absolute(raw)
        parts = [path.name]
        for parent in path.parents:
            if parent.exists() or parent == parent.parent:
                break
            parts.append(parent.name)
        for part in reversed(parts):
            if problem := name_problem(part):
                raise PathNotAllowed(f"save_to {raw!r} is not a safe file name: {problem}. Choose another save_to.")

    def check_write(self, raw: str) -> Path:
        """The absolute target of a write inside the allowed folders (the file itself need not exist)."""
        path = self.absolute(raw)
        parent = path.parent
        # Resolve the deepest existing ancestor: symlinks there must stay inside the allowed folders.
        probe = parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        resolved_parent = probe.resolve() / parent.relative_to(probe)
        target = resolved_parent / path.name
        if ".." in target.parts or not self._inside(target):
            raise PathNotAllowed(
                f"{path} is outside the allowed folders ({self.describe()}). Use a path inside them, or add the "
                "folder to FLUX_MCP_ALLOWED_DIRS."
            )
        if target.is_symlink():
            raise PathNotAllowed(f"{target} is a symbolic link; this server does not write through links.")
        return target

    def display(self, path: Path | str) -> str:
        """The path relative to the first allowed folder when inside it, else absolute."""
        p = Path(path)
        for root in self.folders:
            if p.is_relative_to(root):
                return str(p.relative_to(root))
        return str(p)
