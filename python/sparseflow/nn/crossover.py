"""When a sparse module switches from its sparse kernel to its batched path: more rows of x than
its measured crossover `dense_above` (None: never). One rule for SparseLinear and ActSparseLinear."""

from __future__ import annotations

import torch


def rows_of(x: torch.Tensor) -> int:
    """Rows of x [..., K]: every dimension but the last (0 for an empty x; 1 for a 0-d x, which the
    op then refuses with a message)."""
    return x.numel() // max(1, x.shape[-1]) if x.dim() else 1


def above_crossover(x: torch.Tensor, dense_above: int | None) -> bool:
    return dense_above is not None and rows_of(x) > dense_above
