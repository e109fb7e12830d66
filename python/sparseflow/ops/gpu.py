"""The CUDA-device backends of the table: Triton kernels (top-level kernels/, installed as
sparseflow.kernels), the CUDA C++ kernels in _C (csrc/cuda, built with -DSPARSEFLOW_CUDA=ON) and
torch's own semi-structured 2:4 (cuSPARSELt or CUTLASS), and the batched rows (many rows of x: the
weight decompressed by torch for cuBLAS in x's dtype).

Nothing here imports Triton until a Triton row runs; `available()` of each row only checks that
a GPU and the library are there. Every function has the table's signature: linear fn(x2d, w, bias),
act_sparse_linear fn(x2d, w_t, threshold, bias). The Triton and CUDA C++ kernels launch on torch's
current stream of x's device and never synchronise, so they work under CUDA graphs; the torch 2:4
row waits for a NaN/inf check of x (skipped while a graph is captured)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import weakref

import torch
import torch.nn.functional as F

from .._ext import _C, dtype_code, ptr, strided_rows
from .reference import linear_reference

# Tests set this so that every output element a kernel fails to write shows up as NaN.
POISON_OUTPUTS = False

DECODE_MAX_M = 16  # rows of x the decode (GEMV) kernels take


# ---- availability -------------------------------------------------------------------------------
# Every eager call asks the table which rows are available: the answers that cannot change within
# a process are found once (torch.cuda.is_available costs the host microseconds per call).
@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def gpu_present() -> bool:
    return torch.cuda.is_available()


def triton_ready() -> bool:
    return gpu_present() and triton_installed()


@functools.cache
def cuda_ext_ready() -> bool:
    """The CUDA C++ kernels were compiled into _C and a GPU is present."""
    return hasattr(_C, "cuda_act_sparse_gemv") and gpu_present()


def semi_structured_ready() -> bool:
    """torch's 2:4 sparse matmul: cuSPARSELt on sm_80 and newer; without it, CUTLASS, which torch
    2.11 runs on sm_8x only ("Supported only on GPUs with compute capability 8.x" on an H200)."""
    if not gpu_present():
        return False
    capability = torch.cuda.get_device_capability()
    return capability >= (8, 0) and (torch.backends.cusparselt.is_available() or capability < (9, 0))


# ---- helpers ------------------------------------------------------------------------------------
def _out(x2: torch.Tensor, n: int) -> torch.Tensor | None:
    if not POISON_OUTPUTS:
        return None
    return torch.full((x2.shape[0], n), float("nan"), dtype=x2.dtype, device=x2.device)


def _device(t: torch.Tensor):
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


@functools.lru_cache(maxsize=256)
def rounded_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The threshold as the reference compares it: |x| <= threshold evaluated in x's dtype (made
    once per threshold and dtype: a tensor costs microseconds of host time on every call)."""
    return float(torch.tensor(float(threshold), dtype=dtype).float())


# ---- Triton -------------------------------------------------------------------------------------
def triton_bsr_linear(x2, w, bias):
    from sparseflow.kernels import bsr

    return bsr.bsr_linear(x2, w, bias, out=_out(x2, w.shape[0]))


def triton_nm_linear(x2, w, bias):
    from sparseflow.kernels import nm

    return nm.nm_linear(x2, w, bias, out=_out(x2, w.shape[0]))


def triton_bitmask_linear(x2, w, bias):
    from sparseflow.kernels import bitmask

    return bitmask.bitmask_linear(x2, w, bias, out=_out(x2, w.shape[0]))


def triton_act_sparse_dense(x2, w_t, threshold, bias):
    from sparseflow.kernels import act_sparse

    return act_sparse.act_sparse_dense(x2, w_t, threshold, bias, out=_out(x2, w_t.shape[1]))


# ---- CUDA C++ (csrc/cuda) -----------------------------------------------------------------------
def _cuda_io(x2: torch.Tensor, n: int, bias, workspace_bytes):
    """x2 as rows, the output, the bias contiguous (read as one run), and the CUDA kernels' common
    arguments; the caller holds the tensors returned through the call."""
    x2 = strided_rows(x2)
    bias = None if bias is None else bias.contiguous()
    m = x2.shape[0]
    y = _out(x2, n)
    if y is None:
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    from sparseflow.kernels._common import zeroed_workspace  # no Triton import

    nbytes = workspace_bytes(m, n, x2.shape[1])
    ws = zeroed_workspace(x2.device, nbytes)  # the kernels leave it zeroed: one per stream, no memset
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    return x2, y, bias, dict(bias=ptr(bias), y=ptr(y), ldy=y.stride(0), workspace=ptr(ws),
                             workspace_bytes=nbytes, stream=stream)


def cuda_act_sparse_dense(x2, w_t, threshold, bias):
    """CUDA C++ activation-sparse GEMV (M <= 16)."""
    w_t = strided_rows(w_t)
    k, n = w_t.shape
    if x2.shape[0] == 0:
        return x2.new_empty(0, n)
    with _device(x2):
        x2, y, bias, io = _cuda_io(x2, n, bias, _C.cuda_act_sparse_gemv_workspace_bytes)
        _C.cuda_act_sparse_gemv(dtype=dtype_code(x2.dtype), x=ptr(x2), M=x2.shape[0], K=k, ldx=x2.stride(0),
                                w_t=ptr(w_t), N=n, ldw=w_t.stride(0),
                                threshold=rounded_threshold(threshold, x2.dtype), **io)
    return y


def cuda_nm24_linear(x2, w, bias):
    """CUDA C++ 2:4 GEMV (M <= 16)."""
    n, k = w.shape
    if x2.shape[0] == 0:
        return x2.new_empty(0, n)
    values, index = strided_rows(w.values), strided_rows(w.index)
    with _device(x2):
        x2, y, bias, io = _cuda_io(x2, n, bias, _C.cuda_nm24_gemv_workspace_bytes)
        _C.cuda_nm24_gemv(dtype=dtype_code(x2.dtype), x=ptr(x2), M=x2.shape[0], K=k, ldx=x2.stride(0),
                          values=ptr(values), ldv=values.stride(0), index=ptr(index), ldi=index.stride(0),
                          N=n, **io)
    return y


# ---- torch semi-structured 2:4 (cuSPARSELt / CUTLASS) -------------------------------------------
# The compressed weight is built once per NM weight and cached by the identity of its values
# tensor (dropped with it); a changed version counter (in-place update) rebuilds it.
_SEMI_STRUCTURED: dict[int, tuple] = {}


def semi_structured_weight(w):
    values = w.values
    stamp = (values._version, w.index._version, w.index.data_ptr(), tuple(w.shape))
    entry = _SEMI_STRUCTURED.get(id(values))
    if entry is not None and entry[0]() is values and entry[1] == stamp:
        return entry[2]
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() else \
        SparseSemiStructuredTensorCUTLASS
    sparse = cls.from_dense(w.to_dense())
    if entry is None or entry[0]() is not values:
        weakref.finalize(values, _SEMI_STRUCTURED.pop, id(values), None)
    _SEMI_STRUCTURED[id(values)] = (weakref.ref(values), stamp, sparse)
    return sparse


def semi_structured_applies(w, m: int) -> bool:
    """2:4, prefill-sized M, and shapes every backend of torch's semi-structured matmul accepts
    (CUTLASS wants rows % 32 and columns % 64 for fp16/bf16)."""
    n, k = w.shape
    return (w.n, w.m) == (2, 4) and m > DECODE_MAX_M and n % 64 == 0 and k % 64 == 0


def torch_semi_structured_linear(x2, w, bias):
    """F.linear on torch's 2:4 tensor. Sparse tensor cores never multiply the pruned zeros, so a NaN
    or inf in x would not turn into NaN there as in dense F.linear: such rows are recomputed with
    the reference. The check runs before the matmul and the host waits only for it (the matmul keeps
    running); inside CUDA graph capture it is skipped (no host reads are allowed there)."""
    x2 = x2.contiguous()
    check = None
    if not torch.cuda.is_current_stream_capturing():
        bad = ~torch.isfinite(x2).all(dim=1)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad.any(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        check = (bad, flag, done)
    y = F.linear(x2, semi_structured_weight(w), bias)
    if check is not None:
        bad, flag, done = check
        done.synchronize()
        if bool(flag):
            rows = bad.nonzero().squeeze(1)
            y[rows] = linear_reference(x2[rows], w.to_dense(), bias)
    return y


# ---- batched: many rows of x -------------------------------------------------------------------
# What a layer runs above its measured crossover on a GPU, and the default where a format has no
# kernel for that many rows: the weight decompressed by torch, then cuBLAS in x's dtype, exactly
# dense F.linear's arithmetic (and NaN/inf propagation) on the masked weight. The reference rows,
# which do the same in float32, took 2.1 ms for a 14336x4096 2:4 layer at 512 rows on an H200,
# against 88-92 us for F.linear. N:M and dense decompression never read sizes on the host, so those
# rows run inside CUDA graphs; bitmask, CSR and BSR decompression do.
def decompress_linear(x2, w, bias):
    return F.linear(x2, w.to_dense(), bias)


def act_sparse_batched(x2, w_t, threshold, bias):
    w_t = w_t if isinstance(w_t, torch.Tensor) else w_t.to_dense()
    # hardshrink zeroes -t <= x <= t in one launch (each eager launch costs the host ~10 us): NaN
    # compares false and stays, as in the reference; t in x's dtype, as the reference compares.
    return F.linear(F.hardshrink(x2, rounded_threshold(threshold, x2.dtype)), w_t.t(), bias)


# ---- shape rules of the table rows --------------------------------------------------------------
def decode_only(w, m: int) -> bool:
    return m <= DECODE_MAX_M


def nm24_decode(w, m: int) -> bool:
    return (w.n, w.m) == (2, 4) and m <= DECODE_MAX_M
