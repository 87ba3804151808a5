"""Files on disk: the user cache folder, atomic writes that behave like any file a user
saves, and reads of regular files only.

A write goes to a hidden temporary file in the target's folder (`.act-XXXXXXXX.tmp`, short
enough for any legal target name), is flushed to disk (fsync) and renamed over the target, so
a partial file never replaces a good one. A new file gets the mode the umask allows (0644
under the usual 022); an overwritten file keeps its mode. Temporary files left by a killed
write are removed by the next write to the same folder once they are an hour old.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import TransportFileError

TEMPORARY_PREFIX = ".act-"
TEMPORARY_SUFFIX = ".tmp"
STALE_AFTER_S = 3600.0


def cache_dir() -> Path:
    """The user cache folder: `$ACT_CACHE`, else `$XDG_CACHE_HOME/act`, else `~/.cache/act`."""
    if os.environ.get("ACT_CACHE"):
        return Path(os.environ["ACT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "act"


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring); creates the folder.

    Raises:
        OSError: the folder cannot be created or written; the target is left as it was.
    """
    with atomic_file(path) as temporary, open(temporary, "wb") as file:
        file.write(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary file next to `path` to write; when the block ends it is
    flushed to disk and renamed over `path` (see the module docstring), or removed if the
    block raised. Creates the folder.

    Raises:
        OSError: the folder cannot be created or written; the target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    temporary = path.parent / f"{TEMPORARY_PREFIX}{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        handle = os.open(temporary, os.O_RDONLY)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(handle, stat.S_IMODE(path.stat().st_mode))
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def read_regular_file(path: str | os.PathLike, what: str = "transport file") -> bytes:
    """The bytes of a regular file; a FIFO, device or folder is refused without reading it.

    Raises:
        TransportFileError: the file is missing, unreadable or not a regular file.
    """
    name = str(path)
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise TransportFileError(f"cannot read {what} {name!r}: {error.strerror}") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or device?)"
        raise TransportFileError(f"cannot read {what} {name!r}: it is {kind}")
    with os.fdopen(handle, "rb") as file:
        try:
            return file.read()
        except OSError as error:
            raise TransportFileError(f"cannot read {what} {name!r}: {error.strerror}") from None


def _remove_stale_temporaries(folder: Path) -> None:
    now = time.time()
    for entry in folder.glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
        with contextlib.suppress(OSError):
            if entry.is_file() and now - entry.stat().st_mtime > STALE_AFTER_S:
                entry.unlink()


def _sync_folder(folder: Path) -> None:
    """Flush the rename to disk (POSIX); a no-op where folders cannot be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(handle)
    finally:
        os.close(handle)
