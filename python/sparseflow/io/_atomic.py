"""Atomic file replacement: write a temp file in the destination's directory, fsync it, then
os.replace it over the destination. An exception mid-write (or a crash) leaves the previous file
intact, and the temp file is removed."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms cannot open a directory; the rename is atomic regardless
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls write(temp_path), which must create the temp file, then moves it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory so that os.replace is a rename within one file system; hidden and random so
    # that no reader or concurrent writer picks it up.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync(directory, directory=True)  # makes the rename itself durable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "xb") as f:
            f.write(data)

    atomic_write(path, write)
