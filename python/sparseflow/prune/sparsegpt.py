"""SparseGPT (Frantar & Alistarh 2023): approximate Optimal Brain Surgeon pruning of one layer.

Given the layer's Hessian H = 2/N * X^T X of its calibration inputs (float32), the weights are
visited column by column; pruning a weight w_q costs w_q^2 / [H^-1]_qq and the kept weights of the
same row are updated by -w_q / [H^-1]_qq * H^-1[q, :] to compensate. The row-wise inverse Hessians
are all read off the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Updates are lazy: applied
within a block of B columns first, and to the columns right of the block once per block (one GEMM).

Masks are chosen from the saliency w^2 / U_qq^2 at the moment a block is reached ("adaptive mask
selection"): per block of B columns for unstructured (the round(sparsity) lowest of the block),
per group of m columns for n:m, and per bm x bk tile within the block for block patterns (B is a
multiple of bk so that tiles never straddle two blocks).

Cost for W [N, K]: the Cholesky factorisations O(K^3) and the sweep O(N K^2); memory: H and U
(2 K^2 floats) plus a float32 copy of W."""

from __future__ import annotations

import torch

from .patterns import PatternSpec, block_mask, nm_mask, unstructured_mask

DEFAULT_BLOCKSIZE = 128
DEFAULT_DAMPENING = 0.01
# Lazy updates smaller than this run on the column loop's thread count (see sparsegpt_prune_).
GEMM_THREADS_MIN_MACS = 1 << 27


def lower_triangular_inverse(lower: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """L^-1 for lower-triangular L, one column block at a time: column block j of L^-1 only involves
    L[j:, j:], so the total work is K^3 / 3 (a plain triangular solve against I does K^3)."""
    k = lower.shape[0]
    out = torch.zeros_like(lower)
    eye = torch.eye(min(block, k), dtype=lower.dtype, device=lower.device)
    for j0 in range(0, k, block):
        j1 = min(j0 + block, k)
        out[j0:, j0:j1] = torch.linalg.solve_triangular(
            lower[j0:, j0:], torch.nn.functional.pad(eye[: j1 - j0, : j1 - j0], (0, 0, 0, k - j1)), upper=False
        )
    return out


def inverse_cholesky_upper(hessian: torch.Tensor, dampening: float = DEFAULT_DAMPENING) -> torch.Tensor:
    """Upper-triangular U with (H + damp * mean(diag H) * I)^-1 = U^T U, in float32.

    With J the reversal permutation and J H J = L L^T, H^-1 = (J L^-T J)(J L^-1 J) and J L^-1 J is
    upper triangular: one Cholesky and one triangular inverse, no explicit H^-1. The dampening is
    raised tenfold (up to 4 times) if the factorisation fails. Consumes `hessian` (modified)."""
    h = hessian
    if h.dtype != torch.float32:
        h = h.float()
    diag = h.diagonal()
    dead = diag == 0
    if bool(dead.any()):  # an input that was always zero: give it a unit pivot so H stays invertible
        diag[dead] = 1.0
    mean = float(diag.mean())
    damp = dampening * mean if mean > 0 else 1.0
    diag.add_(damp)
    for attempt in range(5):
        lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if int(info) == 0:
            break
        diag.add_(damp * (10 ** (attempt + 1) - 10**attempt))
    else:
        raise RuntimeError("SparseGPT: the Hessian is not positive definite even after dampening")
    del h, diag
    return lower_triangular_inverse(lower).flip(0, 1)


class _threads:
    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n is not None and self.n != self.saved:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)
        return False


def _sub_blocksize(spec: PatternSpec, lazy: int) -> int:
    """Inner lazy width: 16 columns, or one n:m group if m is larger (a group must not straddle)."""
    unit = spec.m if spec.kind == "n:m" else 1
    size = max(unit, (16 // unit) * unit)
    return min(size, lazy)


def _lazy_blocksize(spec: PatternSpec, blocksize: int) -> int:
    unit = spec.m if spec.kind == "n:m" else spec.block[1] if spec.kind == "block" else 1
    return max(unit, (blocksize // unit) * unit)


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: PatternSpec,
    sparsity: float,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dampening: float = DEFAULT_DAMPENING,
    inverse_upper: torch.Tensor | None = None,
    inner_threads: int | None = 1,
    dead_inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune `weight` [N, K] in place with OBS updates; returns the keep-mask. `hessian` [K, K] is
    X^T X (any positive scale) and is consumed; pass `inverse_upper` (from inverse_cholesky_upper)
    instead to reuse one factorisation for several layers that share the same inputs, with
    `dead_inputs` (the inputs whose diagonal of X^T X is zero).

    The column-by-column part runs on `inner_threads` threads (default 1; None: torch's setting):
    its operations are small ([N, <= B] updates), and waking a thread pool thousands of times per
    layer costs more than it saves, badly so when other processes compete for the cores. The
    lazy block updates (the GEMMs, most of the flops) use torch's thread setting when they are
    large (>= GEMM_THREADS_MIN_MACS multiply-adds)."""
    if spec.kind not in ("unstructured", "n:m", "block"):
        raise ValueError(f"SparseGPT prunes unstructured, n:m and block patterns, not {spec}")
    rows, cols = weight.shape
    if dead_inputs is None and hessian is not None:
        dead_inputs = hessian.diagonal() == 0
    U = inverse_upper if inverse_upper is not None else inverse_cholesky_upper(hessian, dampening)
    if U.shape != (cols, cols):
        raise ValueError(f"Hessian factor has shape {tuple(U.shape)}, expected {(cols, cols)}")
    W = weight.detach().to(torch.float32).clone()
    if dead_inputs is not None and bool(dead_inputs.any()):
        # Inputs that were always zero: their weights never mattered on the calibration data, so they
        # go first (as in the reference implementation); left in, their unit pivot made them look
        # important whenever the live inputs were small, and SparseGPT lost to magnitude.
        W[:, dead_inputs.to(W.device)] = 0
    mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    B = _lazy_blocksize(spec, blocksize)
    S = _sub_blocksize(spec, B)
    threads = torch.get_num_threads()
    carry = [0.0]  # a block pattern's rounding, from one column block to the next (patterns.block_mask)
    with _threads(inner_threads):
        for i1 in range(0, cols, B):
            i2 = min(i1 + B, cols)
            count = i2 - i1
            # The block is worked on transposed, [count, rows], so that a column is a contiguous row.
            W1 = W[:, i1:i2].T.contiguous()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            d1 = U1.diagonal()
            if spec.kind == "unstructured":
                keep1 = unstructured_mask(W1.square().T / d1.square()[None, :], sparsity).T.contiguous()
            elif spec.kind == "block":
                keep1 = block_mask(W1.square().T / d1.square()[None, :], sparsity, spec.block,
                                   carry=carry).T.contiguous()
            else:
                keep1 = torch.ones_like(W1, dtype=torch.bool)
            # Two levels of lazy updates: eager within a sub-block of S columns, one small GEMM to
            # the rest of the block after each sub-block, one large GEMM right of the block.
            for j1 in range(0, count, S):
                j2 = min(j1 + S, count)
                for i in range(j1, j2):
                    if spec.kind == "n:m" and i % spec.m == 0:
                        j = min(i + spec.m, count)
                        keep1[i:j] = nm_mask(W1[i:j].square().T / d1[i:j].square()[None, :], spec.n, spec.m).T
                    w = W1[i]
                    q = w.masked_fill(~keep1[i], 0)
                    err = (w - q) / d1[i]
                    W1[i:j2].addr_(U1[i, i:j2], err, alpha=-1)
                    Q1[i] = q
                    Err1[i] = err
                if j2 < count:
                    W1[j2:].sub_(U1[j1:j2, j2:].T @ Err1[j1:j2])
            W[:, i1:i2] = Q1.T
            mask[:, i1:i2] = keep1.T
            if i2 < cols:
                big = rows * count * (cols - i2) >= GEMM_THREADS_MIN_MACS
                with _threads(threads if big else None):
                    W[:, i2:].sub_(Err1.T @ U[i1:i2, i2:])
    W.masked_fill_(~mask, 0)  # exact zeros, whatever rounding did to the pruned entries
    weight.copy_(W.to(weight.dtype))
    return mask
