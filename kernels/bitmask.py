"""Bitmask GEMV in Triton for decode (M <= 16): y = x @ W^T (+ bias), W an sf.Bitmask.

Each program owns BLOCK_N rows and walks K in BLOCK_K chunks, keeping each row's running offset
into the compacted values. A chunk's mask bits give every stored element its place by an exclusive
prefix sum along the row, so the tile is decompressed in registers with zeros at pruned positions;
those zeros are multiplied too, which makes NaN/inf in x propagate as in dense F.linear.
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
    interpreter_mode,
    m_bucket,
    on_device,
    output,
)
from ._tile import store_tile

INTERPRET = interpreter_mode()


@triton.jit
def bitmask_gemv_kernel(
    x_ptr, v_ptr, mask_ptr, off_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk, stride_mask, stride_ym, m_bucket,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    run = tl.load(off_ptr + offs_n, mask=n_in, other=0)  # int64: where each row's next value is
    mask_rows = mask_ptr + offs_n[:, None].to(tl.int64) * stride_mask

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        byte = tl.load(mask_rows + (offs_k // 8)[None, :], mask=n_in[:, None] & k_in[None, :], other=0)
        bit = (byte.to(tl.int32) >> (offs_k % 8)[None, :]) & 1
        before = tl.cumsum(bit, axis=1) - bit  # stored elements left of each column in this chunk
        w = tl.load(v_ptr + run[:, None] + before, mask=bit != 0, other=0.0)
        run += tl.sum(bit, axis=1)
        if USE_DOT:
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                        mask=m_in[:, None] & k_in[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's numpy dot cannot take bf16
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            x = tl.load(x_ptr + offs_k.to(tl.int64) * stride_xk, mask=k_in, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)[None, :]

    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS)


def _configs(use_dot: bool):
    """Tensor-core tiles need BLOCK_N >= 16; the GEMV also tries few rows per program, since its
    only parallelism is over rows (each row's running offset walks K in order)."""
    configs = [
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=8),
    ]
    if not use_dot:
        configs += [
            triton.Config({"BLOCK_N": 4, "BLOCK_K": 512}, num_warps=4),
            triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=4),
        ]
    return choose_configs(INTERPRET, triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1), configs)


_KEY = ["m_bucket", "N", "K", "BLOCK_M"]
bitmask_gemv = triton.autotune(_configs(False), key=_KEY)(bitmask_gemv_kernel)  # M = 1
bitmask_tiles = triton.autotune(_configs(True), key=_KEY)(bitmask_gemv_kernel)  # 2 <= M <= 16

MAX_M = 16


def bitmask_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """y[M, N] = x2 @ w.to_dense().T (+ bias) for an sf.Bitmask weight w, M <= 16."""
    n_out, k = w.shape
    check_x(x2, k, w.dtype, "bitmask_linear", INTERPRET)
    m = x2.shape[0]
    if m > MAX_M:
        raise ValueError(f"bitmask_linear is a decode kernel: M must be <= {MAX_M}, got {m}")
    y = output(x2, n_out, out)
    if m == 0:
        return y
    values, mask, offsets = w.values.contiguous(), w.mask, w.row_offsets.contiguous()
    if mask.stride(1) != 1:
        mask = mask.contiguous()
    bias_arg, has_bias = bias_or_dummy(bias, y)
    block_m = 1 if m == 1 else 16
    with on_device(x2):
        (bitmask_gemv if block_m == 1 else bitmask_tiles)[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]),)](
            x2, values, mask, offsets, bias_arg, y, m, n_out, k, x2.stride(0), x2.stride(1), mask.stride(0),
            y.stride(0), m_bucket(m), HAS_BIAS=has_bias, BLOCK_M=block_m, USE_DOT=block_m > 1,
            UPCAST_DOT=INTERPRET, DOT_PRECISION=dot_precision(x2.dtype))
    return y
