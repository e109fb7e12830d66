"""Atomic file replacement: write a temp file in the destination's directory, fsync it, then
os.replace it over the destination. An exception mid-write (or a crash) leaves the previous file
intact, and the temp file is removed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def write_result(path: str | os.PathLike, text: str) -> None:
    """A result file (report, JSON, markdown): its folder made, the file replaced atomically (a
    failed write leaves the previous result as it was)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """fig.savefig(path), atomically: the format from the path's suffix, or matplotlib's default
    format appended as savefig does. Returns the path written."""
    import matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    if not fmt:
        fmt = matplotlib.rcParams["savefig.format"]
        path = path.with_name(f"{path.name}.{fmt}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
    return path


@contextlib.contextmanager
def replacing_files(directory: str | os.PathLike, names: tuple[str, ...]):
    """A sibling temporary directory to write a set of files into; on success its files replace
    `names` in `directory` (each atomically, in the order given: put the file that names the others
    last), on failure it is removed: a failed save leaves the previous files as they were."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        for name in names:
            if (tmp / name).exists():
                os.replace(tmp / name, directory / name)
        _fsync(str(directory), directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
