"""Importance scores of single weights, and the two calibration-light one-shot pruners built on them.

- magnitude: |W|, compared over the whole layer (tiles for block patterns, groups for n:m);
- Wanda (Sun et al. 2023): |W_ij| * ||x_j||_2, where ||x_j|| is the norm of input feature j over
  the calibration tokens, compared within each output row (as the paper found best).

Both only zero weights; SparseGPT (sparsegpt.py) also updates the kept ones."""

from __future__ import annotations

import torch

from .patterns import PatternSpec, select_mask


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| * ||x_j||: `input_sq_sum` [in] is the sum over calibration tokens of x_j**2."""
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(f"input statistics have shape {tuple(input_sq_sum.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().float().abs() * input_sq_sum.to(weight.device, torch.float32).clamp_min(0).sqrt()[None, :]


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the weights where mask is False, in place (a pruned NaN or inf becomes 0, not NaN)."""
    weight.masked_fill_(~mask.to(weight.device), 0)
    return weight


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, spec: PatternSpec, sparsity: float) -> torch.Tensor:
    """Prune `weight` [out, in] in place by |W| over the layer; returns the keep-mask."""
    mask = select_mask(magnitude_scores(weight), spec, sparsity, per_row=False)
    apply_mask_(weight, mask)
    return mask


@torch.no_grad()
def wanda_prune_(weight: torch.Tensor, input_sq_sum: torch.Tensor, spec: PatternSpec, sparsity: float) -> torch.Tensor:
    """Prune `weight` in place by |W| * ||x||, per output row (per row of tiles for block
    patterns); returns the keep-mask."""
    mask = select_mask(wanda_scores(weight, input_sq_sum), spec, sparsity, per_row=True)
    apply_mask_(weight, mask)
    return mask
