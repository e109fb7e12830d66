"""When a sparse module switches from its sparse kernel to its batched path: more rows of x than
its measured crossover `dense_above` (None: never). One rule for SparseLinear and ActSparseLinear."""

from __future__ import annotations

import torch

from ..ops.table import rows_of


def above_crossover(x: torch.Tensor, dense_above: int | None) -> bool:
    return dense_above is not None and rows_of(x) > dense_above
