"""The epilogue the tile kernels (bitmask, N:M, BSR) share: bias, conversion to y's dtype, masked
store of one [BLOCK_M, BLOCK_N] tile."""

import triton
import triton.language as tl


@triton.jit
def store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_in, n_in, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])
