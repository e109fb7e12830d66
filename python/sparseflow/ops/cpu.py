"""The C++ CPU backends: raw pointers into sparseflow._C, which picks the ISA level at run time.

Kernels flag rows of x that hold NaN or inf; those rows are recomputed with the reference, so the
result is exactly what dense F.linear gives (0 * inf = NaN at pruned weights included)."""

from __future__ import annotations

import torch

from .._ext import _C, dtype_code, ptr
from ..formats import BSR, CSR, NM, Bitmask
from .reference import act_sparse_linear_reference, linear_reference

# Tests set this so that every output element a kernel fails to write shows up as NaN.
POISON_OUTPUTS = False


def _io(x2: torch.Tensor, n_out: int, bias: torch.Tensor | None):
    """Contiguous-row x, the output, and the keyword arguments every kernel takes."""
    if x2.stride(-1) != 1 or x2.stride(0) < x2.shape[1]:
        x2 = x2.contiguous()
    m, k = x2.shape
    y = torch.empty(m, n_out, dtype=x2.dtype)
    if POISON_OUTPUTS:
        y.fill_(float("nan"))
    kw = dict(
        dtype=dtype_code(x2.dtype), x=ptr(x2), M=m, K=k, ldx=max(x2.stride(0), k) if m > 1 else k,
        y=ptr(y), N=n_out, ldy=n_out, bias=ptr(bias), threads=torch.get_num_threads(),
    )
    return x2, y, kw


def _fix_nonfinite(rows, x2, y, recompute):
    """Rows of x that held NaN/inf (listed by the kernel) are recomputed by the reference."""
    if rows:
        idx = torch.tensor(rows, dtype=torch.int64)
        y[idx] = recompute(x2[idx])
    return y


def bitmask_linear(x2, w: Bitmask, bias):
    x2, y, kw = _io(x2, w.shape[0], bias)
    v, mask, offs = w.values.contiguous(), w.mask.contiguous(), w.row_offsets.contiguous()
    n = _C.bitmask_linear(ptr(v), ptr(mask), ptr(offs), w.shape[0], w.shape[1], mask.shape[1], v.numel(), **kw)
    return _fix_nonfinite(n, x2, y, lambda xr: linear_reference(xr, w.to_dense(), bias))


def csr_linear(x2, w: CSR, bias):
    x2, y, kw = _io(x2, w.shape[0], bias)
    v, col, rp = w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous()
    bits = 16 if col.dtype == torch.int16 else 32
    n = _C.csr_linear(ptr(v), ptr(col), bits, ptr(rp), w.shape[0], w.shape[1], v.numel(), **kw)
    return _fix_nonfinite(n, x2, y, lambda xr: linear_reference(xr, w.to_dense(), bias))


def bsr_linear(x2, w: BSR, bias):
    x2, y, kw = _io(x2, w.shape[0], bias)
    v, col, rp = w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous()
    bm, bk = w.block
    n = _C.bsr_linear(ptr(v), ptr(col), ptr(rp), w.shape[0], w.shape[1], bm, bk, v.shape[0], **kw)
    return _fix_nonfinite(n, x2, y, lambda xr: linear_reference(xr, w.to_dense(), bias))


def nm_linear(x2, w: NM, bias):
    x2, y, kw = _io(x2, w.shape[0], bias)
    v, idx = w.values.contiguous(), w.index.contiguous()
    n = _C.nm_linear(ptr(v), ptr(idx), w.shape[0], w.shape[1], w.n, w.m, idx.shape[1], **kw)
    return _fix_nonfinite(n, x2, y, lambda xr: linear_reference(xr, w.to_dense(), bias))


def act_sparse_dense(x2, w_t: torch.Tensor, threshold: float, bias):
    x2, y, kw = _io(x2, w_t.shape[1], bias)
    if w_t.stride(1) != 1:
        w_t = w_t.contiguous()
    _C.act_sparse_dense(ptr(w_t), w_t.shape[0], w_t.shape[1], w_t.stride(0), float(threshold), **kw)
    return y  # a dense w_t propagates NaN/inf by itself


def act_sparse_bitmask(x2, w_t: Bitmask, threshold: float, bias):
    x2, y, kw = _io(x2, w_t.shape[1], bias)
    v, mask, offs = w_t.values.contiguous(), w_t.mask.contiguous(), w_t.row_offsets.contiguous()
    n = _C.act_sparse_bitmask(
        ptr(v), ptr(mask), ptr(offs), w_t.shape[0], w_t.shape[1], mask.shape[1], v.numel(), float(threshold), **kw
    )
    return _fix_nonfinite(n, x2, y, lambda xr: act_sparse_linear_reference(xr, w_t.to_dense(), threshold, bias))
