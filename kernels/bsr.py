"""BSR sparse linear in Triton for any M: y = x @ W^T (+ bias), W an sf.BSR with block (bm, bk).

A program owns SUB_N rows of one block row (a whole block row when SUB_N == bm; splitting it gives
decode enough programs) and BLOCK_M rows of x, and walks that block row's stored blocks. M = 1 is a
GEMV; otherwise a tile of x meets each block on tensor cores when bm, bk >= 16, and by broadcast
products for smaller blocks.

NaN/inf: stored blocks are dense tiles, so they propagate as in dense; a pruned block multiplies
x by zeros that dense F.linear would have turned into NaN. A pre-pass flags, per row of x, the
bk-wide column chunks holding a NaN or inf and counts them; the main loop adds up the flags of the
chunks its stored blocks met (one small load per block, no pass over the x tile); a row whose
counts differ gets NaN over the block row, exactly what dense gives.
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
)
from ._tile import store_tile

INTERPRET = interpreter_mode()


@triton.jit
def nonfinite_chunks_kernel(x_ptr, flags_ptr, total_ptr, K, C, stride_xm, stride_xk, CHUNK: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """flags[m, c] = 1 where column chunk c (CHUNK wide) of x[m] holds a NaN or inf; total[m] = their count."""
    m = tl.program_id(0)
    count = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        k = c[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k.to(tl.int64) * stride_xk, mask=k < K,
                    other=0.0).to(tl.float32)
        bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1)
        tl.store(flags_ptr + m.to(tl.int64) * C + c, bad.to(tl.int8), mask=c < C)
        count += bad
    tl.store(total_ptr + m, tl.sum(count, axis=0))


@triton.jit
def bsr_matmul_kernel(
    x_ptr, v_ptr, col_ptr, rowptr_ptr, flags_ptr, total_ptr, bias_ptr, y_ptr,
    M, N, K, C, stride_xm, stride_xk, stride_ym, m_bucket,
    BM_W: tl.constexpr, BK_W: tl.constexpr, SUB_N: tl.constexpr, SUB_N_MAX: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # SUB_N_MAX is what the autotuner sets; the heuristic turns it into SUB_N = min(bm, SUB_N_MAX).
    PARTS: tl.constexpr = BM_W // SUB_N
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = pid // PARTS  # block row
    part = pid % PARTS
    rows_in_block = part * SUB_N + tl.arange(0, SUB_N)
    offs_n = r * BM_W + rows_in_block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kb = tl.arange(0, BK_W)
    m_in = offs_m < M
    start = tl.load(rowptr_ptr + r)
    end = tl.load(rowptr_ptr + r + 1)

    acc = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    seen = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for b in range(start, end):
        c = tl.load(col_ptr + b).to(tl.int64)
        offs_k = c * BK_W + offs_kb
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_in[:, None] & (offs_k < K)[None, :], other=0.0)
        # Edge blocks are zero-padded in storage, so the whole block is in bounds.
        w = tl.load(v_ptr + b * (BM_W * BK_W) + rows_in_block[:, None] * BK_W + offs_kb[None, :])
        seen += tl.load(flags_ptr + offs_m.to(tl.int64) * C + c, mask=m_in, other=0).to(tl.int32)
        if USE_DOT:
            if UPCAST_DOT:  # the interpreter's numpy dot cannot take bf16
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    # NaN/inf of x in a pruned block: dense would give NaN over this block row.
    total = tl.load(total_ptr + offs_m, mask=m_in, other=0)
    acc = tl.where((total > seen)[:, None], float("nan"), acc)
    n_in = offs_n < N
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS)


def _sub_n(args) -> int:
    return min(args["BM_W"], args["SUB_N_MAX"])


def _configs(kind: str):
    """Configs set SUB_N_MAX (rows of a block per program, capped by bm) and, for prefill, BLOCK_M."""
    extra = {"BLOCK_M": 16} if kind == "prefill" else {}
    small = triton.Config({"SUB_N_MAX": 16, **extra}, num_warps=1)
    if kind == "prefill":
        configs = [
            triton.Config({"BLOCK_M": 64, "SUB_N_MAX": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "SUB_N_MAX": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "SUB_N_MAX": 64}, num_warps=4, num_stages=3),
        ]
    else:
        configs = [
            triton.Config({"SUB_N_MAX": 16}, num_warps=4),
            triton.Config({"SUB_N_MAX": 32}, num_warps=4),
            triton.Config({"SUB_N_MAX": 64}, num_warps=4),
        ]
    return choose_configs(INTERPRET, small, configs)


def _tuned(kind: str, key):
    return triton.autotune(_configs(kind), key=key)(triton.heuristics({"SUB_N": _sub_n})(bsr_matmul_kernel))


_KEY = ["m_bucket", "N", "K", "BM_W", "BK_W", "BLOCK_M", "USE_DOT"]
bsr_decode = _tuned("decode", _KEY)       # M <= 16: BLOCK_M given (1: GEMV; 16: one tile)
bsr_prefill = _tuned("prefill", _KEY[:5])  # M > 16, blocks >= 16x16: BLOCK_M tuned

DECODE_MAX_M = 16


def nonfinite_chunks(x2: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, C] flags of the chunk-wide column chunks of x2 that hold a NaN or inf, int32 [M]
    their count per row), C = ceil(K / chunk)."""
    m, k = x2.shape
    c = triton.cdiv(k, chunk)
    flags = torch.empty(m, c, dtype=torch.int8, device=x2.device)
    total = torch.empty(m, dtype=torch.int32, device=x2.device)
    block_c = max(1, min(triton.next_power_of_2(c), 2048 // chunk))
    nonfinite_chunks_kernel[(m,)](x2, flags, total, k, c, x2.stride(0), x2.stride(1), CHUNK=chunk, BLOCK_C=block_c)
    return flags, total


def bsr_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y[M, N] = x2 @ w.to_dense().T (+ bias) for an sf.BSR weight w (any M)."""
    n_out, k = w.shape
    bm, bk = w.block
    check_x(x2, k, w.dtype, "bsr_linear", INTERPRET)
    y = output(x2, n_out, out)
    m = x2.shape[0]
    if m == 0:
        return y
    if (done := in_row_launches(bsr_linear, x2, y, w, bias)) is not None:
        return done
    values, col, row_ptr = w.values.contiguous(), w.col_indices.contiguous(), w.row_ptr.contiguous()
    bias_arg, has_bias = bias_or_dummy(bias, y)
    block_rows = triton.cdiv(n_out, bm)
    common = dict(BM_W=bm, BK_W=bk, HAS_BIAS=has_bias, UPCAST_DOT=INTERPRET,
                  DOT_PRECISION=dot_precision(x2.dtype))

    def grid(meta):
        return block_rows * (bm // meta["SUB_N"]), triton.cdiv(m, meta["BLOCK_M"])

    with on_device(x2):
        flags, total = nonfinite_chunks(x2, bk)
        args = (x2, values, col, row_ptr, flags, total, bias_arg, y, m, n_out, k, flags.shape[1], x2.stride(0),
                x2.stride(1), y.stride(0), m_bucket(m))
        big_blocks = bm >= 16 and bk >= 16
        if m == 1:
            bsr_decode[grid](*args, BLOCK_M=1, USE_DOT=False, **common)
        elif m <= DECODE_MAX_M or not big_blocks:
            # Small blocks use broadcast products, which keep BLOCK_M at 16.
            bsr_decode[grid](*args, BLOCK_M=16, USE_DOT=big_blocks, **common)
        else:
            bsr_prefill[grid](*args, USE_DOT=True, **common)
    return y
