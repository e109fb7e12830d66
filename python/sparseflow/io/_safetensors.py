"""Reading and writing safetensors files with errors that name the file: a crafted or truncated
file raises ValueError, never a raw safetensors error."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._atomic import atomic_write


def _open_error(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})")


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's string metadata only (no tensor data is read)."""
    path = _check_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except MemoryError:
        raise
    except Exception as e:
        raise _open_error(path, e) from e


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, every tensor on the CPU). Raises ValueError if the file is not valid
    safetensors (bad header, length or offsets, truncated data)."""
    path = _check_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError and a few builtins
        raise _open_error(path, e) from e
    return metadata, tensors


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomic write of CPU copies of `tensors` (contiguous, no shared storage, as safetensors needs)."""
    flat, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        # Tied or sliced tensors: safetensors refuses tensors that share storage.
        if t.numel() and _storage_key(t) in seen:
            t = t.clone()
        seen.add(_storage_key(t))
        flat[name] = t
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
