"""N:M sparse linear in Triton (2:4 and any n:m with m in {4, 8, 16}): y = x @ W^T (+ bias).

The weight stays compressed in memory (values [N, groups*n] and packed positions: 2 bits for
m = 4, else 4 bits) and is decompressed in registers: each program rebuilds a dense tile
[BLOCK_N, BLOCK_K] (zeros at pruned positions) and multiplies it with x. Multiplying the zeros
too costs nothing in a memory-bound GEMV and makes NaN/inf in x propagate exactly as in dense
F.linear (0 * inf = NaN at pruned weights).

Decode (M <= 16): one program per BLOCK_N rows, a GEMV (M = 1) or a 16-row tensor-core tile.
Prefill: tensor-core tiles [BLOCK_M, BLOCK_N] in grouped order for L2 reuse.
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
def nm_matmul_kernel(
    x_ptr, v_ptr, idx_ptr, bias_ptr, y_ptr,
    M, N, K, G, stride_xm, stride_xk, stride_vn, stride_in, stride_ym, m_bucket,
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_G: tl.constexpr = BLOCK_K // MM
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share each weight tile while it is in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    offs_g = tl.arange(0, BLOCK_G)
    slots = tl.arange(0, MM)
    v_rows = v_ptr + offs_n[:, None].to(tl.int64) * stride_vn
    i_rows = idx_ptr + offs_n[:, None].to(tl.int64) * stride_in

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + offs_g
        w_mask = n_in[:, None] & (g < G)[None, :]
        # Decompress: tile[n, g, s] = the value stored at slot s of group g, else 0.
        tile = tl.zeros((BLOCK_N, BLOCK_G, MM), dtype=tl.float32)
        for j in tl.static_range(NN):
            f = g * NN + j  # field (value and position) index within the row
            v = tl.load(v_rows + f[None, :], mask=w_mask, other=0.0).to(tl.float32)
            byte = tl.load(i_rows + ((f * BITS) // 8)[None, :], mask=w_mask, other=0)
            pos = (byte.to(tl.int32) >> ((f * BITS) % 8)[None, :]) & ((1 << BITS) - 1)
            tile = tl.where(pos[:, :, None] == slots[None, None, :], v[:, :, None], tile)
        cols = g[:, None] * MM + slots[None, :]  # [BLOCK_G, MM] input columns
        # A partial last group: columns past K do not exist in the dense weight.
        tile = tl.where((cols < K)[None, :, :], tile, 0.0)
        if USE_DOT:
            w = tl.reshape(tile, (BLOCK_N, BLOCK_K))
            offs_k = g0 * MM + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_in[:, None] & (offs_k < K)[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's numpy dot cannot take bf16
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w).to(x.dtype), acc, input_precision=DOT_PRECISION)
        else:
            # GEMV (BLOCK_M == 1): x as [BLOCK_G, MM], no reshape of the tile needed.
            x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + cols * stride_xk,
                        mask=(cols < K) & (pid_m < M), other=0.0).to(tl.float32)
            acc += tl.sum(tl.sum(tile * x[None, :, :], axis=2), axis=1)[None, :]

    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS)


def _decode_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1), [
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4),
    ])


def _prefill_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1), [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ])


_KEY = ["m_bucket", "N", "K", "NN", "MM", "BLOCK_M"]
nm_decode = triton.autotune(_decode_configs(), key=_KEY)(nm_matmul_kernel)
nm_prefill = triton.autotune(_prefill_configs(), key=_KEY[:-1])(nm_matmul_kernel)

DECODE_MAX_M = 16


def nm_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """y[M, N] = x2 @ w.to_dense().T (+ bias) for an sf.NM weight w."""
    n_out, k = w.shape
    check_x(x2, k, w.dtype, "nm_linear", INTERPRET)
    y = output(x2, n_out, out)
    m = x2.shape[0]
    if m == 0:
        return y
    values, index = w.values, w.index
    if values.stride(1) != 1:
        values = values.contiguous()
    if index.stride(1) != 1:
        index = index.contiguous()
    bias_arg, has_bias = bias_or_dummy(bias, y)
    groups = -(-k // w.m)
    args = (x2, values, index, bias_arg, y, m, n_out, k, groups, x2.stride(0), x2.stride(1), values.stride(0),
            index.stride(0), y.stride(0), m_bucket(m))
    common = dict(NN=w.n, MM=w.m, BITS=2 if w.m == 4 else 4, HAS_BIAS=has_bias, UPCAST_DOT=INTERPRET,
                  DOT_PRECISION=dot_precision(x2.dtype))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    with on_device(x2):
        if m <= DECODE_MAX_M:
            block_m = 1 if m == 1 else 16
            nm_decode[grid](*args, BLOCK_M=block_m, GROUP_M=1, USE_DOT=block_m > 1, **common)
        else:
            nm_prefill[grid](*args, GROUP_M=8, USE_DOT=True, **common)
    return y
