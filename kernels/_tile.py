"""The epilogues the tile kernels share: `store_tile` (bias, conversion to y's dtype, masked store
of one [BLOCK_M, BLOCK_N] tile) and `store_split_k` (the same after the K slices of a tile met in
an fp32 workspace)."""

import triton
import triton.language as tl


@triton.jit
def store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def store_split_k(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, split_k, offs_m, offs_n, m_in, n_in, N, stride_ym,
                  HAS_BIAS: tl.constexpr):
    """Split K: each program adds its fp32 partial sums into the workspace [M, N] with atomics and
    takes a ticket of its output tile; the last one stores the tile and leaves its part of the
    workspace and its ticket at zero for the next call (the workspace is cached per stream, see
    _common.zeroed_workspace: no memset launch per call). Atomics never touch bf16 or fp16 memory,
    which is what lets bf16 work (Triton has no bf16 atomic add on most GPUs)."""
    if split_k == 1:
        store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS)
    else:
        out_mask = m_in[:, None] & n_in[None, :]
        ws_ptrs = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="relaxed")
        # Every thread's partial sums are in before one thread takes the ticket (release).
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == split_k - 1:
            # Last program of this tile: the workspace now holds the full sums (read past L1).
            total = tl.load(ws_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptrs, tl.zeros_like(total), mask=out_mask)
            tl.store(cnt_ptr + tile, 0)
            store_tile(total, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS)
