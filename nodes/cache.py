"""The collection cache: collected samples kept on disk, keyed by everything that made them.

Collect Activations stores its samples under a key, the SHA-256 of the canonical JSON of
plain values (the prompts, every collection setting, and the identity of the MODEL and CLIP
from `nodes.identity`), so switching graphs or restarting ComfyUI does not collect again,
while any change of an input collects anew.

An entry is one file `<key>.samples` in the folder: a safetensors file with a JSON header
(`act.samples_io`; never pickle), written atomically. The folder is
`$ACT_COLLECTION_CACHE_DIR`, else `models/act/cache` of ComfyUI (its `.samples` files stay
out of Load Transport's list). Its size is capped at `$ACT_COLLECTION_CACHE_GB` gigabytes
(default 2; 0 turns the cache off): after each store the least recently used entries are
deleted until the rest fit. Deleting the folder clears the cache.

No ComfyUI import here: this module is plain Python over `act`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..act import ActError, Samples
from ..act.files import write_atomically
from ..act.samples_io import samples_from_bytes, samples_to_bytes

CACHE_VERSION = 1  # bump when collection changes what it records
SIZE_ENV = "ACT_COLLECTION_CACHE_GB"
FOLDER_ENV = "ACT_COLLECTION_CACHE_DIR"
DEFAULT_GB = 2.0
SUFFIX = ".samples"
MODES = ["use", "refresh", "off"]
_KEY = re.compile(r"[0-9a-f]{64}")


def cache_key(parts: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of `parts` as canonical JSON: plain values only (None, bools,
    numbers, strings, lists, string-keyed dicts); key order does not matter.

    Raises:
        ActError: a value is not plain (e.g. a tensor or a NaN), named in the message.
    """
    try:
        text = json.dumps(
            {"cache_version": CACHE_VERSION, **parts},
            sort_keys=True,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError) as error:
        raise ActError(f"a collection cache key takes plain values only: {error}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def size_limit(environ: Mapping[str, str] = os.environ) -> int:
    """The cache's size cap in bytes, from `$ACT_COLLECTION_CACHE_GB` (default 2 GB).

    Raises:
        ActError: the variable is not a non-negative number (its value is named).
    """
    text = environ.get(SIZE_ENV, "").strip()
    if not text:
        return int(DEFAULT_GB * 1e9)
    try:
        gigabytes = float(text)
    except ValueError:
        gigabytes = math.nan
    if not math.isfinite(gigabytes) or gigabytes < 0:
        raise ActError(
            f"{SIZE_ENV}={text!r} is not a size in gigabytes: set a number such as 2 (0 turns "
            "the collection cache off)"
        )
    return int(gigabytes * 1e9)


def cache_folder(default: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> Path:
    """`$ACT_COLLECTION_CACHE_DIR` if set, else `default`."""
    return Path(environ.get(FOLDER_ENV) or default)


class SampleCache:
    """Samples stored by key in `folder`, at most `max_bytes` in all (least recently used
    entries go first; loading an entry counts as a use)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        """The file of `key` (a SHA-256 hex digest from `cache_key`)."""
        if not _KEY.fullmatch(key):
            raise ActError(f"invalid collection cache key {key!r}: expected 64 hex digits")
        return self.folder / f"{key}{SUFFIX}"

    def load(self, key: str) -> Samples | None:
        """The samples stored under `key`, or None. An unreadable or corrupted entry is
        deleted and counts as missing."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            samples = samples_from_bytes(data, str(path))
        except ActError:
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the most recently used now
        return samples

    def store(self, key: str, samples: Samples) -> bool:
        """Write `samples` under `key` (atomically), then drop the least recently used
        entries beyond the size cap. False (nothing written) if the entry alone is over it.

        Raises:
            OSError: the folder cannot be written.
        """
        data = samples_to_bytes(samples)
        if len(data) > self.max_bytes:
            return False
        path = self.path(key)
        write_atomically(path, data)
        self._evict(keep=path)
        return True

    def entries(self) -> list[Path]:
        """The entry files, least recently used first."""
        found = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime_ns, path))
        return [path for _, path in sorted(found)]

    def clear(self) -> int:
        """Delete every entry; the number deleted."""
        entries = self.entries()
        for path in entries:
            path.unlink(missing_ok=True)
        return len(entries)

    def _evict(self, keep: Path) -> None:
        sizes = {}
        for path in self.entries():
            with contextlib.suppress(OSError):
                sizes[path] = path.stat().st_size
        total = sum(sizes.values())
        for path, size in sizes.items():
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
