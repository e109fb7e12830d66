"""Activation-sparse linear in Triton: y = x_active @ w_t (+ bias), w_t the transposed weight [K, N].

An input k is active unless |x[m, k]| <= threshold (NaN and inf are always active). Because the
weight is transposed, input k owns the contiguous row w_t[k, :]; in the GEMV (M = 1) a row whose
input is inactive is never loaded (its masked loads issue no memory traffic), so the bytes read
shrink with the activation density. The threshold test is fused into the one read of x.

Decode (M <= 16) splits K across programs so a GEMV fills the GPU; the slices of a tile meet in
an fp32 workspace (_tile.store_split_k), so bf16 works without bf16 atomics.
Prefill (M > 16) uses one program per output tile on tensor cores, no split. Tiles of 16 or more
rows of x read every weight row: together those rows need nearly all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    bias_or_dummy,
    check_x,
    choose_configs,
    dot_precision,
    in_row_launches,
    interpreter_mode,
    m_bucket,
    on_device,
    output,
    split_k_buffers,
    split_k_for,
    split_k_heuristic,
    unsplit_buffers,
)
from ._tile import store_split_k

INTERPRET = interpreter_mode()


@triton.jit
def act_sparse_dense_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, threshold, split_k, m_bucket,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    # This program's slice of K: a whole number of BLOCK_K chunks.
    k_span = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        # Out-of-range lanes read 0: inactive unless the threshold is negative (masked below).
        active = ~(tl.abs(x) <= threshold)
        xa = tl.where(active, x, 0.0)
        w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
        if USE_DOT:
            # A tile of 16+ rows of x needs nearly every weight row, and a load whose mask waits on
            # x cannot be issued stages ahead: read the whole tile, as a dense GEMM does.
            w = tl.load(w_ptrs, mask=k_in[:, None] & n_in[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's numpy dot cannot take bf16
                acc = tl.dot(xa, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(xa.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        else:
            row_live = tl.max(active.to(tl.int32), axis=0) > 0
            # k_in too: with a negative threshold the lanes past K count as active
            w = tl.load(w_ptrs, mask=(row_live & k_in)[:, None] & n_in[None, :], other=0.0)
            acc += tl.sum(xa[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)

    store_split_k(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, pid_m * tl.num_programs(0) + pid_n, split_k, offs_m,
                  offs_n, m_in, n_in, N, stride_ym, HAS_BIAS)


def _decode_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1), [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 16}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4),
    ])


def _prefill_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1), [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ])


_KEY = ["m_bucket", "N", "K", "BLOCK_M", "USE_DOT"]

# Decode: split-K; the autotuner zeroes the workspace and tickets around each trial run.
act_sparse_decode = triton.autotune(_decode_configs(), key=_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"])(
    triton.heuristics({"split_k": split_k_heuristic})(act_sparse_dense_kernel))
act_sparse_prefill = triton.autotune(_prefill_configs(), key=["m_bucket", "N", "K"])(act_sparse_dense_kernel)

DECODE_MAX_M = 16


def act_sparse_dense(x2: torch.Tensor, w_t: torch.Tensor, threshold: float, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """y[M, N] = x2_active @ w_t (+ bias) for a dense transposed weight w_t [K, N].

    `split_k` forces the split of K (tests); by default decode (M <= 16) picks one that fills
    the GPU and prefill does not split."""
    k, n = w_t.shape
    check_x(x2, k, w_t.dtype, "act_sparse_dense", INTERPRET)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be an int >= 1, got {split_k!r}")  # 0 left the workspace dirty
    y = output(x2, n, out)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y
    if k == 0:  # nothing to sum: the bias alone
        return y.zero_() if bias is None else y.copy_(bias.expand_as(y))
    if (done := in_row_launches(act_sparse_dense, x2, y, w_t, threshold, bias)) is not None:
        return done
    # Compare |x| with the threshold rounded to x's dtype, as the torch reference does.
    thr = float(torch.tensor(float(threshold), dtype=x2.dtype).float())
    bias_arg, has_bias = bias_or_dummy(bias, y)
    upcast = INTERPRET
    common = dict(HAS_BIAS=has_bias, UPCAST_DOT=upcast, DOT_PRECISION=dot_precision(x2.dtype))
    strides = (x2.stride(0), x2.stride(1), w_t.stride(0), w_t.stride(1), y.stride(0))
    with on_device(x2):
        if m <= DECODE_MAX_M:
            block_m = 1 if m == 1 else 16
            use_dot = block_m >= 16
            ws, cnt = split_k_buffers(x2.device, m, n, block_m)
            args = (x2, w_t, bias_arg, y, ws, cnt, m, n, k, *strides, thr)

            def grid(meta):  # the grid sees only constexprs as plain values, so split_k is recomputed
                split = split_k or split_k_for(m, n, triton.cdiv(k, meta["BLOCK_K"]), block_m, meta["BLOCK_N"],
                                               x2.device)
                return triton.cdiv(n, meta["BLOCK_N"]), split, triton.cdiv(m, block_m)

            if split_k is None:
                act_sparse_decode[grid](*args, m_bucket=m_bucket(m), BLOCK_M=block_m, USE_DOT=use_dot,
                                        **common)
            else:
                cfg = _decode_configs()[0]
                act_sparse_dense_kernel[grid](*args, split_k=split_k, m_bucket=m_bucket(m), BLOCK_M=block_m,
                                              USE_DOT=use_dot, **cfg.kwargs, num_warps=cfg.num_warps,
                                              **common)
        else:
            if split_k not in (None, 1):
                raise ValueError("prefill (M > 16) does not split K")
            ws, cnt = unsplit_buffers(x2.device)
            args = (x2, w_t, bias_arg, y, ws, cnt, m, n, k, *strides, thr, 1)

            def grid(meta):
                return triton.cdiv(n, meta["BLOCK_N"]), 1, triton.cdiv(m, meta["BLOCK_M"])

            act_sparse_prefill[grid](*args, m_bucket=m_bucket(m), USE_DOT=True, **common)
    return y
