"""The C++ CPU backends: raw pointers into sparseflow._C, which picks the ISA level at run time.

Kernels flag rows of x that hold NaN or inf; those rows are recomputed with the reference, so the
result is exactly what dense F.linear gives (0 * inf = NaN at pruned weights included)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

from .._ext import _C, dtype_code, ptr, strided_rows
from ..formats import BSR, CSR, NM, Bitmask
from .reference import act_sparse_linear_reference, linear_reference

# Tests set this so that every output element a kernel fails to write shows up as NaN.
POISON_OUTPUTS = False


def _io(x: torch.Tensor, n_out: int, bias: torch.Tensor | None, code: int):
    """x as contiguous rows [M, K] (any leading dims: M is their product), the output [..., n_out],
    the bias contiguous (the kernels read it as one run; an exported graph may pass a strided one),
    and the arguments every kernel takes after its weight's, in the binding's order (dtype, x, M, K,
    ldx, y, N, ldy, bias, threads); the caller holds the x and bias returned through the call. Few
    torch calls and arguments by position: each costs microseconds with cold caches, which is what a
    layer meets in a model."""
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    shape = x.shape
    k, m = shape[-1], 1
    for s in shape[:-1]:
        m *= s
    y = x.new_empty((*shape[:-1], n_out))  # x's dtype and device (CPU), not torch's defaults
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
    io = (code, x.data_ptr(), m, k, k, y.data_ptr(), n_out, n_out, ptr(bias), torch.get_num_threads())
    return x, y, bias, io


def _fix_nonfinite(rows, x, y, recompute):
    """Rows of x that held NaN/inf (listed by the kernel) are recomputed by the reference."""
    if rows:
        x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        idx = torch.tensor(rows, dtype=torch.int64)
        y2[idx] = recompute(x2[idx])
    return y


def _linear_kernel(w):
    """The C++ row kernel of w's format and its weight arguments, with w's buffers made contiguous
    once (returned too: the pointers are only valid while they live)."""
    n, k = w.shape
    if isinstance(w, Bitmask):
        keep = v, mask, offs = w.values.contiguous(), w.mask.contiguous(), w.row_offsets.contiguous()
        return _C.bitmask_linear, (ptr(v), ptr(mask), ptr(offs), n, k, mask.shape[1], v.numel()), keep
    if isinstance(w, CSR):
        keep = v, col, rp = w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous()
        bits = 16 if col.dtype == torch.int16 else 32
        return _C.csr_linear, (ptr(v), ptr(col), bits, ptr(rp), n, k, v.numel()), keep
    if isinstance(w, BSR):
        keep = v, col, rp = w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous()
        return _C.bsr_linear, (ptr(v), ptr(col), ptr(rp), n, k, *w.block, v.shape[0]), keep
    if isinstance(w, NM):
        keep = v, idx = w.values.contiguous(), w.index.contiguous()
        return _C.nm_linear, (ptr(v), ptr(idx), n, k, w.n, w.m, idx.shape[1]), keep
    raise TypeError(f"no C++ linear kernel for {type(w).__name__}")


def bind_linear(w) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """fn(x, bias) = F.linear(x, w.to_dense(), bias) by w's C++ kernel for CPU x [..., K] of w's dtype,
    with the weight's pointers and sizes bound once: a module that keeps fn pays only for x on each
    call (ops/bound.py)."""
    kernel, args, keep = _linear_kernel(w)
    n, code = w.shape[0], dtype_code(w.dtype)

    def run(x: torch.Tensor, bias: torch.Tensor | None, _keep=keep) -> torch.Tensor:
        x, y, bias, io = _io(x, n, bias, code)
        rows = kernel(*args, *io)
        return _fix_nonfinite(rows, x, y, lambda xr: linear_reference(xr, w.to_dense(), bias))

    return run


def sparse_linear(x2, w, bias):
    """The table's C++ row for every weight format."""
    return bind_linear(w)(x2, bias)


def bind_act_sparse(w_t) -> Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]:
    """fn(x, threshold, bias) = act_sparse_linear(x, w_t, threshold, bias) by the C++ kernel for a
    dense or Bitmask w_t [K, N] and CPU x [..., K] of its dtype, with the weight's pointers and
    sizes bound once."""
    k, n = w_t.shape
    dense = not isinstance(w_t, Bitmask)
    if not dense:
        keep = v, mask, offs = w_t.values.contiguous(), w_t.mask.contiguous(), w_t.row_offsets.contiguous()
        kernel, args = _C.act_sparse_bitmask, (ptr(v), ptr(mask), ptr(offs), k, n, mask.shape[1], v.numel())
    else:
        keep = (w := strided_rows(w_t),)
        kernel, args = _C.act_sparse_dense, (ptr(w), k, n, w.stride(0))

    code = dtype_code(w_t.dtype)

    def run(x: torch.Tensor, threshold: float, bias: torch.Tensor | None, _keep=keep) -> torch.Tensor:
        x, y, bias, io = _io(x, n, bias, code)
        rows = kernel(*args, float(threshold), *io)
        if dense:
            return y  # a dense w_t propagates NaN/inf by itself
        return _fix_nonfinite(rows, x, y,
                              lambda xr: act_sparse_linear_reference(xr, w_t.to_dense(), threshold, bias))

    return run


def act_sparse(x2, w_t, threshold: float, bias):
    """The table's C++ row for activation-sparse linear (dense or Bitmask w_t)."""
    return bind_act_sparse(w_t)(x2, threshold, bias)


# ---- batched path: decompress cache-sized chunks of rows, dense GEMM on each ----------------------
# A chunk of the dense weight stays in the last-level cache between its decompression and its GEMM,
# so the dense weight never travels to DRAM and is never whole in memory (the per-thread buffer holds
# one chunk: 8-32 MiB). Chunks hold about max(CHUNK_BYTES, 2 x the bytes of x), at most
# MAX_CHUNK_BYTES: with many rows of x each GEMM call re-reads x, and fewer, larger chunks win. On a
# 2-core Zen 4 with 32 MiB of L3, 4 and 8 MiB chunks measured alike, 2 MiB and 16 MiB slower
# (benchmarks/bench_batched.py); 8 MiB halves the GEMM calls, each of which costs a scheduler tick
# when another process holds a core. The decompression runs on torch's own OpenMP threads
# (csrc/cpu/thread_pool.h).
CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 128  # narrower GEMMs lose more than the cache saves


def _decompressor(w):
    """fn(row0, row1, out_ptr, ld, threads, cols=None, cursor=0): the C++ decompression of w's rows
    [row0, row1) (and, for a Bitmask, columns cols = (col0, col1), multiples of 8 or col1 = K, with an
    optional int64 cursor per row, see csrc/cpu/kernels/args.h) into a buffer with row stride ld. The
    buffers are made contiguous once, here, and kept by fn."""
    rows, cols = w.shape
    if isinstance(w, Bitmask):
        bufs = (w.values.contiguous(), w.mask.contiguous(), w.row_offsets.contiguous())
        v, mask, offs = bufs
        call, args = _C.bitmask_decompress, (ptr(v), ptr(mask), ptr(offs), rows, cols, mask.shape[1], v.numel())
    elif isinstance(w, CSR):
        bufs = (w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous())
        v, col, rp = bufs
        bits = 16 if col.dtype == torch.int16 else 32
        call, args = _C.csr_decompress, (ptr(v), ptr(col), bits, ptr(rp), rows, cols, v.numel())
    elif isinstance(w, BSR):
        bufs = (w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous())
        v, col, rp = bufs
        call, args = _C.bsr_decompress, (ptr(v), ptr(col), ptr(rp), rows, cols, *w.block, v.shape[0])
    elif isinstance(w, NM):
        bufs = (w.values.contiguous(), w.index.contiguous())
        v, idx = bufs
        call, args = _C.nm_decompress, (ptr(v), ptr(idx), rows, cols, w.n, w.m, idx.shape[1])
    else:
        raise TypeError(f"no C++ decompression for {type(w).__name__}")
    code = dtype_code(w.dtype)

    def run(row0: int, row1: int, out: int, ld: int, threads: int, cols=None, cursor: int = 0, _bufs=bufs) -> None:
        if cols is None:
            call(*args, code, row0, row1, out, ld, threads)
        else:
            call(*args, code, row0, row1, out, ld, threads, col0=cols[0], col1=cols[1], cursor=cursor)

    return run


def decompress(w, row0: int = 0, row1: int | None = None, out: torch.Tensor | None = None,
               col0: int = 0, col1: int | None = None) -> torch.Tensor:
    """Rows [row0, row1) of a CPU weight as a dense tensor, bit for bit what w.to_dense()[row0:row1]
    holds, written by the C++ kernels (threads: torch.get_num_threads()). A Bitmask also takes a
    column range [col0, col1) (multiples of 8, or col1 = K): w.to_dense()[row0:row1, col0:col1]."""
    rows, cols = w.shape
    row1 = rows if row1 is None else row1
    col1 = cols if col1 is None else col1
    shape = (max(0, row1 - row0), max(0, col1 - col0))
    if out is None:
        out = torch.empty(shape, dtype=w.dtype)
        if POISON_OUTPUTS:
            out.fill_(float("nan"))
    elif out.dtype != w.dtype or out.dim() != 2 or tuple(out.shape) != shape or out.stride(1) != 1:
        raise ValueError(f"out must be {w.dtype} {list(shape)} with unit column stride")
    col_range = (col0, col1) if (col0, col1) != (0, cols) else None
    if col_range and not isinstance(w, Bitmask):
        raise ValueError(f"column ranges are for Bitmask weights only, not {type(w).__name__}")
    _decompressor(w)(row0, row1, ptr(out), max(1, out.stride(0)), torch.get_num_threads(), col_range)
    return out


_SCRATCH = threading.local()


def _scratch(numel: int, dtype: torch.dtype, slot: str = "chunk") -> torch.Tensor:
    """A per-thread buffer reused across calls (a fresh one of this size comes from mmap and
    page-faults on every call); one per slot, for buffers that are in use at the same time."""
    key = f"buf_{slot}"
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_SCRATCH, key, buf)
    return buf[:numel]


def chunk_rows(n: int, k: int, m: int, dtype: torch.dtype, chunk_bytes: int | None = None) -> int:
    """Weight rows per decompressed chunk for x with m rows (see CHUNK_BYTES); a multiple of 64 when
    it is not the whole weight."""
    esize = dtype.itemsize
    if chunk_bytes is None:
        chunk_bytes = min(MAX_CHUNK_BYTES, max(CHUNK_BYTES, 2 * m * k * esize))
    rows = max(MIN_CHUNK_ROWS, chunk_bytes // (k * esize))
    return n if rows >= n else rows - rows % 64


def _output(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The [m, n] output of a batched path (poisoned under the tests, so an unwritten slice shows)."""
    y = torch.empty(m, n, dtype=dtype)
    return y.fill_(float("nan")) if POISON_OUTPUTS else y


def decompress_linear(x2, w, bias, chunk_bytes: int | None = None):
    """F.linear(x2, w.to_dense(), bias) for many rows of x: each chunk of weight rows is decompressed
    by the C++ kernels into a cache-sized buffer and multiplied by torch's dense GEMM into its slice
    of y. Dense semantics throughout (NaN/inf in x propagate as in F.linear)."""
    n, k = w.shape
    m = x2.shape[0]
    y = _output(m, n, x2.dtype)
    if m == 0:
        return y
    rows = chunk_rows(n, k, m, w.dtype, chunk_bytes)
    buf = _scratch(rows * k, w.dtype).view(rows, k)
    run, threads = _decompressor(w), torch.get_num_threads()
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        chunk = buf[: n1 - n0]
        run(n0, n1, ptr(chunk), k, threads)
        if bias is None:
            torch.mm(x2, chunk.t(), out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x2, chunk.t(), out=y[:, n0:n1])
    return y


_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@functools.lru_cache(maxsize=4096)
def _threshold_bits(threshold: float, dtype: torch.dtype) -> int:
    """The threshold's bits in x's dtype (rounded as the comparison in that dtype rounds it); cached:
    building a tensor for it cost more than the pass itself on a prefill-sized x."""
    thr = torch.tensor(threshold, dtype=dtype)
    # the magnitude bits: -0.0 must compare as +0.0 (a set sign bit would exceed every |x|)
    return int(thr.view(_INT[dtype])) & (0x7FFF if thr.element_size() == 2 else 0x7FFFFFFF)


def zero_inactive(x2: torch.Tensor, threshold: float, reuse: bool = False) -> torch.Tensor:
    """x2 with the inputs the reference skips (|x| <= threshold, compared in x's dtype) set to zero;
    NaN and inf stay. One C++ pass over the bits (torch.where on bf16 takes ~20x longer).
    `reuse=True` writes into this thread's scratch buffer, for a caller that is done with the result
    before its next call (a prefill-sized fresh buffer page-faults: ~0.2 ms per layer measured)."""
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    out = _scratch(x2.numel(), x2.dtype, "x").view(x2.shape) if reuse else torch.empty(x2.shape, dtype=x2.dtype)
    bits = _threshold_bits(float(threshold), x2.dtype)
    m, k = x2.shape
    _C.zero_inactive(dtype_code(x2.dtype), ptr(x2), m, k, x2.stride(0), ptr(out), k, bits, torch.get_num_threads())
    return out


def act_sparse_batch_rows(dtype: torch.dtype) -> int:
    """From how many rows of x the C++ act-sparse kernel runs a batch its own way rather than row by
    row (bf16 with AVX-512: from 2 rows, csrc/cpu/kernels/gemm_union.h, which reads each row of the
    weight once for the whole batch, up to 7 rows, 23 with a bitmask weight; then gemm_skip.h, a
    GEMM over each row's active inputs); 0: never. Per ISA level (SPARSEFLOW_ISA or sf.isa() may
    change it within a process)."""
    return _batch_rows_at(dtype, _C.active_isa())


@functools.lru_cache(maxsize=32)
def _batch_rows_at(dtype: torch.dtype, isa: str) -> int:
    return _C.act_sparse_batch_rows(dtype_code(dtype)) if dtype in _INT else 0


def kernel_takes_batch(dtype: torch.dtype, rows: int) -> bool:
    """Whether the C++ act-sparse kernel runs this many rows as a batch of its own, which measured
    faster than zeroing x for torch's GEMM (at 50% active, 2 threads: 1.4-1.9x of dense from 8 to
    512 rows with a dense weight). The batched path then calls that kernel, so a module may call its
    bound kernel directly."""
    first = act_sparse_batch_rows(dtype)
    return 0 < first <= rows


def act_sparse_dense_batched(x2, w_t: torch.Tensor, threshold: float, bias):
    """act_sparse_linear for many rows of x: the C++ kernel's own GEMM where it takes the batch (see
    kernel_takes_batch); else the skipped inputs are zeroed and one dense GEMM in x's dtype does the
    rest (as F.linear would, NaN/inf in x included)."""
    if kernel_takes_batch(x2.dtype, x2.shape[0]):
        return act_sparse(x2, w_t, threshold, bias)
    xs = zero_inactive(x2, threshold, reuse=True)
    return torch.mm(xs, w_t) if bias is None else torch.addmm(bias, xs, w_t)


def act_sparse_bitmask_batched(x2, w_t: Bitmask, threshold: float, bias):
    """act_sparse_linear for many rows of x and a Bitmask w_t [K, N]: the C++ kernel's own GEMM where it
    takes the batch (see kernel_takes_batch); else the skipped inputs are zeroed, and the output
    columns go in chunks: the C++ kernels decompress w_t[:, n0:n1] (every row, a
    column range of each) into a cache-sized buffer for torch's GEMM."""
    if kernel_takes_batch(x2.dtype, x2.shape[0]):
        return act_sparse(x2, w_t, threshold, bias)
    k, n = w_t.shape
    m = x2.shape[0]
    y = _output(m, n, x2.dtype)
    if m == 0:
        return y
    xs = zero_inactive(x2, threshold, reuse=True)
    cols = chunk_rows(n, k, m, w_t.dtype)  # columns of w_t per chunk: K elements each, a multiple of 64
    buf = _scratch(cols * k, w_t.dtype)
    run, threads = _decompressor(w_t), torch.get_num_threads()
    cursor = w_t.row_offsets[:-1].clone()  # each row's next value: the ranges go left to right
    for n0 in range(0, n, cols):
        n1 = min(n, n0 + cols)
        chunk = buf[: k * (n1 - n0)].view(k, n1 - n0)
        run(0, k, ptr(chunk), n1 - n0, threads, (n0, n1), ptr(cursor))
        if bias is None:
            torch.mm(xs, chunk, out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], xs, chunk, out=y[:, n0:n1])
    return y
