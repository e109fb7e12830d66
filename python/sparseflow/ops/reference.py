"""Plain-torch references: decompress, then dense math with float32 accumulation. Every backend
is tested against these, and they are the always-available backend of the table."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_reference(x: torch.Tensor, w_dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w_dense.float(), b).to(x.dtype)


def act_sparse_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Active inputs: |x| > threshold, and NaN (which compares false with everything)."""
    return ~(x.abs() <= threshold)


def act_sparse_linear_reference(
    x: torch.Tensor, w_t_dense: torch.Tensor, threshold: float, bias: torch.Tensor | None
) -> torch.Tensor:
    xs = torch.where(act_sparse_mask(x, threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = xs.float() @ w_t_dense.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
