"""N:M sparse linear in Triton (2:4 and any n:m with m in {4, 8, 16}): y = x @ W^T (+ bias).

The weight stays compressed in memory (values [N, groups*n] and packed positions: 2 bits for
m = 4, else 4 bits) and is decompressed in registers: each program rebuilds a dense tile
[BLOCK_N, BLOCK_K] (zeros at pruned positions) and multiplies it with x. Multiplying the zeros
too costs nothing in a memory-bound GEMV and makes NaN/inf in x propagate exactly as in dense
F.linear (0 * inf = NaN at pruned weights).

2:4 tiles are built from one contiguous load of the value pairs, selects and in-thread joins
(decompress_24); other patterns by a compare per slot (decompress_nm).

Decode (M <= 16): BLOCK_N rows per program, a GEMV (M = 1) or a 16-row tensor-core tile, with K
split across programs so the GPU fills (_tile.store_split_k). Prefill: tensor-core tiles
[BLOCK_M, BLOCK_N] in grouped order for L2 reuse.
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
    split_k_buffers,
    split_k_for,
    split_k_heuristic,
    unsplit_buffers,
)
from ._tile import store_split_k

INTERPRET = interpreter_mode()


@triton.jit
def decompress_24(v_rows, i_rows, g0, G, n_in, w_mask, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """2:4 tile [BLOCK_N, 4 * BLOCK_G] in the values' dtype: each group's two values (one contiguous
    load of the row's pairs) put at their 2-bit positions by selects, interleaved by joins that stay
    within a thread (no shuffle through shared memory)."""
    f = g0 * 2 + tl.arange(0, 2 * BLOCK_G)  # the tile's value fields, two per group
    v = tl.load(v_rows + f[None, :], mask=n_in[:, None] & (f < 2 * G)[None, :], other=0.0)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
    g = g0 + tl.arange(0, BLOCK_G)
    nib = (tl.load(i_rows + (g // 2)[None, :], mask=w_mask, other=0).to(tl.int32) >> ((g % 2) * 4)[None, :]) & 15
    p0 = nib & 3
    p1 = nib >> 2
    zero = tl.zeros_like(v0)
    s0 = tl.where(p0 == 0, v0, tl.where(p1 == 0, v1, zero))
    s1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
    s2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
    s3 = tl.where(p0 == 3, v0, tl.where(p1 == 3, v1, zero))
    # join(join(s0, s2), join(s1, s3))[n, g, b, a] = s[2b + a]: flattened, column 4g + 2b + a.
    return tl.reshape(tl.join(tl.join(s0, s2), tl.join(s1, s3)), (BLOCK_N, 4 * BLOCK_G))


@triton.jit
def decompress_nm(v_rows, i_rows, g, w_mask, NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Any n:m tile [BLOCK_N, MM * BLOCK_G] in fp32: tile[n, g, s] = the value stored at slot s."""
    slots = tl.arange(0, MM)
    tile = tl.zeros((BLOCK_N, BLOCK_G, MM), dtype=tl.float32)
    for j in tl.static_range(NN):
        f = g * NN + j  # field (value and position) index within the row
        v = tl.load(v_rows + f[None, :], mask=w_mask, other=0.0).to(tl.float32)
        byte = tl.load(i_rows + ((f * BITS) // 8)[None, :], mask=w_mask, other=0)
        pos = (byte.to(tl.int32) >> ((f * BITS) % 8)[None, :]) & ((1 << BITS) - 1)
        tile = tl.where(pos[:, :, None] == slots[None, None, :], v[:, :, None], tile)
    return tl.reshape(tile, (BLOCK_N, BLOCK_G * MM))


@triton.jit
def nm_matmul_kernel(
    x_ptr, v_ptr, idx_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, G, stride_xm, stride_xk, stride_vn, stride_in, stride_ym, split_k, m_bucket,
    NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_G: tl.constexpr = BLOCK_K // MM
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share each weight tile while it is in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    # This program's slice of the groups: a whole number of BLOCK_G chunks (all of them unless split).
    g_span = tl.cdiv(tl.cdiv(G, split_k), BLOCK_G) * BLOCK_G
    g_lo = pid_k * g_span
    g_hi = tl.minimum(g_lo + g_span, G)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    v_rows = v_ptr + offs_n[:, None].to(tl.int64) * stride_vn
    i_rows = idx_ptr + offs_n[:, None].to(tl.int64) * stride_in

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(g_lo, g_hi, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        offs_k = g0 * MM + tl.arange(0, BLOCK_K)
        if EVEN_K:  # K is a multiple of BLOCK_K: no column past K, no partial group
            w_mask = n_in[:, None] & (g >= 0)[None, :]
        else:
            w_mask = n_in[:, None] & (g < G)[None, :]
        if NN == 2 and MM == 4:
            w = decompress_24(v_rows, i_rows, g0, G, n_in, w_mask, BLOCK_N, BLOCK_G)
        else:
            w = decompress_nm(v_rows, i_rows, g, w_mask, NN, MM, BITS, BLOCK_N, BLOCK_G)
        # A partial last group: columns past K do not exist in the dense weight. Tensor-core tiles
        # take the select always: fed straight from the joins, the tile fails Triton 3.6's Hopper
        # dot-operand pass ("Illegal shared layout").
        if not EVEN_K or USE_DOT:
            w = tl.where((offs_k < K)[None, :], w, 0.0)
        if USE_DOT:
            x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
            x = tl.load(x_ptrs, mask=m_in[:, None] & (offs_k < K)[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter's numpy dot cannot take bf16
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w).to(x.dtype), acc, input_precision=DOT_PRECISION)
        else:  # GEMV (BLOCK_M == 1)
            x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + offs_k.to(tl.int64) * stride_xk,
                        mask=(offs_k < K) & (pid_m < M), other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)[None, :]

    store_split_k(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, split_k, offs_m, offs_n, m_in, n_in, N, stride_ym,
                  HAS_BIAS)


def _decode_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1), [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4),
    ])


def _prefill_configs():
    return choose_configs(INTERPRET, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1), [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ])


def _even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


_KEY = ["m_bucket", "N", "K", "NN", "MM", "BLOCK_M"]
# Decode: split-K; the autotuner zeroes the workspace and tickets around each trial run.
nm_decode = triton.autotune(_decode_configs(), key=_KEY, reset_to_zero=["ws_ptr", "cnt_ptr"])(
    triton.heuristics({"split_k": split_k_heuristic, "EVEN_K": _even_k})(nm_matmul_kernel))
nm_prefill = triton.autotune(_prefill_configs(), key=_KEY[:-1])(
    triton.heuristics({"EVEN_K": _even_k})(nm_matmul_kernel))

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
    common = dict(NN=w.n, MM=w.m, BITS=2 if w.m == 4 else 4, HAS_BIAS=has_bias, UPCAST_DOT=INTERPRET,
                  DOT_PRECISION=dot_precision(x2.dtype))
    strides = (x2.stride(0), x2.stride(1), values.stride(0), index.stride(0), y.stride(0))

    with on_device(x2):
        if m <= DECODE_MAX_M:
            block_m = 1 if m == 1 else 16
            ws, cnt = split_k_buffers(x2.device, m, n_out, block_m)

            def grid(meta):  # the grid sees only constexprs as plain values, so split_k is recomputed
                split = split_k_for(m, n_out, triton.cdiv(k, meta["BLOCK_K"]), block_m, meta["BLOCK_N"], x2.device)
                return triton.cdiv(m, block_m) * triton.cdiv(n_out, meta["BLOCK_N"]), split

            nm_decode[grid](x2, values, index, bias_arg, y, ws, cnt, m, n_out, k, groups, *strides,
                            m_bucket=m_bucket(m), BLOCK_M=block_m, GROUP_M=1, USE_DOT=block_m > 1, **common)
        else:
            ws, cnt = unsplit_buffers(x2.device)

            def grid(meta):
                return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]), 1

            nm_prefill[grid](x2, values, index, bias_arg, y, ws, cnt, m, n_out, k, groups, *strides, 1,
                             m_bucket(m), GROUP_M=8, USE_DOT=True, **common)
    return y
