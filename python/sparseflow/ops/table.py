"""The one table of backends. Dispatch, tests and benchmarks all read it: a new kernel is one row
here plus its file.

A row says which op and weight format it computes, on which device type and dtypes, for which
shapes (`applies(w, m)`, m = rows of x), and whether it can run in this process (`available`).
Dispatch takes the first row that fits, so rows are listed fastest first; `reference` is last and
always fits. `batched` (many rows of x: the weight decompressed, on the CPU in cache-sized chunks,
for a dense GEMM) comes after the kernels: which is faster at a given row count is measured per
layer (sf.sparsify), and the modules ask for it by name above their crossover (see BATCHED). On a
GPU it is also the default where a format has no kernel for that many rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import cpu, gpu
from .reference import act_sparse_linear_reference, linear_reference

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _always(*_args) -> bool:
    return True


def _batched(w, m: int) -> bool:
    return m > 1


@dataclass(frozen=True)
class Backend:
    op: str                   # "linear" | "act_sparse_linear"
    format: str               # weight format: "bitmask" | "csr" | "bsr" | "nm" | "dense"
    device: str               # "cpu" | "cuda"
    name: str                 # "cpp" | "batched" | "triton" | "cuda" | "torch" | "reference"
    fn: Callable              # linear: fn(x2d, w, bias); act_sparse_linear: fn(x2d, w_t, threshold, bias)
    dtypes: tuple = ALL_DTYPES
    applies: Callable = field(default=_always)    # (w, m) -> bool
    available: Callable = field(default=_always)  # () -> bool
    # (w) -> fn(x2, bias) (act_sparse_linear: fn(x2, threshold, bias)): fn with w's pointers bound
    # once, which a module keeps between calls (ops/bound.py); for rows that apply at every row count
    bind: Callable | None = None

    @property
    def key(self) -> str:
        return f"{self.op}/{self.format}/{self.device}/{self.name}"


def _ref_linear(x2, w, bias):
    return linear_reference(x2, w.to_dense(), bias)


def _ref_act_sparse(x2, w_t, threshold, bias):
    dense = w_t if isinstance(w_t, torch.Tensor) else w_t.to_dense()
    return act_sparse_linear_reference(x2, dense, threshold, bias)


BACKENDS: list[Backend] = [
    # ---- C++ CPU kernels (csrc/cpu/kernels), one per format; ISA chosen inside _C ----
    *(Backend("linear", f, "cpu", "cpp", cpu.sparse_linear, bind=cpu.bind_linear)
      for f in ("bitmask", "csr", "bsr", "nm")),
    *(Backend("act_sparse_linear", f, "cpu", "cpp", cpu.act_sparse, bind=cpu.bind_act_sparse)
      for f in ("dense", "bitmask")),
    # many rows of x: decompress cache-sized chunks of the weight (C++) for torch's dense GEMM
    *(Backend("linear", f, "cpu", "batched", cpu.decompress_linear, applies=_batched)
      for f in ("bitmask", "csr", "bsr", "nm")),
    Backend("act_sparse_linear", "dense", "cpu", "batched", cpu.act_sparse_dense_batched, applies=_batched),
    Backend("act_sparse_linear", "bitmask", "cpu", "batched", cpu.act_sparse_bitmask_batched, applies=_batched),
    # ---- GPU (CUDA device): torch 2:4, CUDA C++ (csrc/cuda), Triton (kernels/); see ops/gpu.py ----
    Backend("linear", "nm", "cuda", "torch", gpu.torch_semi_structured_linear,
            (torch.bfloat16, torch.float16), applies=gpu.semi_structured_applies,
            available=gpu.semi_structured_ready),
    Backend("linear", "nm", "cuda", "cuda", gpu.cuda_nm24_linear, applies=gpu.nm24_decode,
            available=gpu.cuda_ext_ready),
    Backend("linear", "nm", "cuda", "triton", gpu.triton_nm_linear, available=gpu.triton_ready),
    Backend("linear", "bsr", "cuda", "triton", gpu.triton_bsr_linear, available=gpu.triton_ready),
    Backend("linear", "bitmask", "cuda", "triton", gpu.triton_bitmask_linear, applies=gpu.decode_only,
            available=gpu.triton_ready),
    Backend("act_sparse_linear", "dense", "cuda", "cuda", gpu.cuda_act_sparse_dense, applies=gpu.decode_only,
            available=gpu.cuda_ext_ready),
    Backend("act_sparse_linear", "dense", "cuda", "triton", gpu.triton_act_sparse_dense,
            available=gpu.triton_ready),
    *(Backend("linear", f, "cuda", "batched", gpu.decompress_linear, applies=_batched,
              available=torch.cuda.is_available)
      for f in ("bitmask", "csr", "bsr", "nm")),
    *(Backend("act_sparse_linear", f, "cuda", "batched", gpu.act_sparse_batched, applies=_batched,
              available=torch.cuda.is_available)
      for f in ("dense", "bitmask")),
    # ---- plain torch, any device ----
    *(Backend("linear", f, d, "reference", _ref_linear)
      for f in ("bitmask", "csr", "bsr", "nm") for d in ("cpu", "cuda")),
    *(Backend("act_sparse_linear", f, d, "reference", _ref_act_sparse)
      for f in ("dense", "bitmask") for d in ("cpu", "cuda")),
]


# What a layer runs above its measured crossover (many rows of x), per device type: on the CPU the
# weight decompressed in cache-sized chunks by C++, on a GPU by torch, each for a dense GEMM.
BATCHED = {"cpu": "batched", "cuda": "batched"}


def rows_of(x: torch.Tensor) -> int:
    """Rows of x [..., K]: the product of every dimension but the last (1 for a 0-d x, which the op
    then refuses with a message)."""
    # (not x.numel() // K: K may be 0, and an exported graph keeps a sym_numel node that a later
    # torch.compile of the program cannot trace)
    return math.prod(x.shape[:-1]) if x.dim() else 1


def batched_backend(device_type: str, m: int) -> str:
    """The backend name for m rows of x above a layer's crossover on this device type."""
    return BATCHED.get(device_type, "reference") if _batched(None, m) else "reference"


def backends(op: str | None = None, format: str | None = None, device: str | None = None) -> list[Backend]:
    """Rows matching the given fields (None matches all), in priority order."""
    return list(_rows(BACKENDS, op, format, device))


# Every eager call selects its row: the rows matching (op, format, device) are found once per
# table (tests swap BACKENDS for a new list, which starts a new cache).
_ROWS: dict[tuple, tuple[Backend, ...]] = {}
_ROWS_OF: list[list[Backend]] = [BACKENDS]


def _rows(table: list[Backend], op, format, device) -> tuple[Backend, ...]:
    if _ROWS_OF[0] is not table:
        _ROWS.clear()
        _ROWS_OF[0] = table
    key = (op, format, device)
    rows = _ROWS.get(key)
    if rows is None:
        rows = _ROWS[key] = tuple(b for b in table if (op is None or b.op == op)
                                  and (format is None or b.format == format) and (device is None or b.device == device))
    return rows


def select(op: str, format: str, x: torch.Tensor, w, m: int, name: str = "") -> Backend:
    """The backend dispatch uses: the first row that fits, or the row called `name`."""
    for b in _rows(BACKENDS, op, format, x.device.type):
        if name and b.name != name:
            continue
        if x.dtype in b.dtypes and b.available() and b.applies(w, m):
            return b
    if name:  # a caller's choice: say what does not fit
        names = sorted({b.name for b in BACKENDS})
        if name not in names:
            raise ValueError(f"unknown backend {name!r}; the table's are {names}")
        raise ValueError(f"backend {name!r} does not run {op} for {format} weights on {x.device.type} in {x.dtype} "
                         f"with {m} rows of x")
    raise RuntimeError(f"no {op} backend for {format} weights on {x.device.type} in {x.dtype} (m={m})")
