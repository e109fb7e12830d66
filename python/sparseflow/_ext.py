"""Access to the compiled extension `sparseflow._C` and the raw-pointer conventions it uses."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import _C  # noqa: F401  (built by CMake; see csrc/binding.cpp)


def _openmp_runtimes() -> int:
    """Distinct libgomp files mapped into this process (Linux; 0 where that cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            return len({line.split()[-1] for line in maps if line.rstrip().rsplit("/", 1)[-1].startswith("libgomp")})
    except OSError:
        return 0


# _C runs decompression on torch's OpenMP threads by linking libgomp.so.1, which resolves to the
# copy torch loaded. A torch whose libgomp has another name makes ours a second runtime with its own
# spinning workers: then the kernels keep to their own pool.
if _C.shares_torch_threads() and _openmp_runtimes() > 1:
    _C.set_shares_torch_threads(False)

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ISA_LEVELS = ("scalar", "avx2", "avx512")


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"sparseflow kernels take float32, bfloat16 or float16, not {dtype}") from None


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def strided_rows(t: torch.Tensor) -> torch.Tensor:
    """t as rows a kernel walks with a row stride: unit stride along the last dimension, rows that
    do not overlap (an expanded tensor's do), else a contiguous copy."""
    return t if t.stride(-1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[-1]) else t.contiguous()


def available_isas() -> list[str]:
    """ISA levels this CPU can run, lowest first."""
    best = _C.best_isa()
    return list(ISA_LEVELS[: ISA_LEVELS.index(best) + 1])


def active_isa() -> str:
    return _C.active_isa()


@contextlib.contextmanager
def isa(level: str) -> Iterator[None]:
    """Force the kernels to an ISA level for the duration (what SPARSEFLOW_ISA does process-wide)."""
    if level not in ISA_LEVELS:
        raise ValueError(f"ISA level {level!r} is not one of {ISA_LEVELS}")
    old = os.environ.get("SPARSEFLOW_ISA")
    os.environ["SPARSEFLOW_ISA"] = level
    try:
        _C.active_isa()  # raises ValueError when the CPU lacks the level
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSEFLOW_ISA", None)
        else:
            os.environ["SPARSEFLOW_ISA"] = old
