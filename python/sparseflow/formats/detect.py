"""Which compressed format a weight's zeros allow."""

from __future__ import annotations

import torch

from .base import check_weight
from .bsr import BSR


class Pattern(str):
    """The pattern's name ("dense", "2:4", "4:8", "block(32,32)", "unstructured") with details:
    kind ("dense" | "n:m" | "block" | "unstructured"), density, and n, m or block where they apply."""

    kind: str
    density: float
    n: int | None
    m: int | None
    block: tuple[int, int] | None

    def __new__(cls, name, kind, density, n=None, m=None, block=None):
        obj = super().__new__(cls, name)
        obj.kind, obj.density, obj.n, obj.m, obj.block = kind, density, n, m, block
        return obj

    def __repr__(self) -> str:
        return f"Pattern({str(self)!r}, density={self.density:.4f})"


BLOCK_SIDES = (128, 64, 32, 16, 8, 4)
BLOCK_FILL = 0.9  # a block pattern's kept blocks are at least this full


def detect_pattern(w: torch.Tensor) -> Pattern:
    """The most structured pattern the weight satisfies: dense, n:m (n <= m/2, m in 4, 8, 16),
    square block(b,b) with b a power of two from 4 to 128 whose kept blocks are >= 90% full,
    else unstructured."""
    w = check_weight(w)
    rows, cols = w.shape
    nonzero = w != 0
    nnz = int(nonzero.sum())
    density = nnz / w.numel()
    if nnz == w.numel():
        return Pattern("dense", "dense", 1.0)
    if nnz == 0:
        return Pattern("unstructured", "unstructured", 0.0)
    for m in (4, 8, 16):
        if cols < m:
            break
        counts = torch.nn.functional.pad(nonzero, (0, (-cols) % m)).view(rows, -1, m).sum(-1)
        n = int(counts.max())
        if 2 * n <= m:
            return Pattern(f"{n}:{m}", "n:m", density, n=n, m=m)
    for b in BLOCK_SIDES:
        if rows < b or cols < b:
            continue
        kept = BSR.blocked(nonzero, (b, b)).any(-1).any(-1)
        covered = int(kept.sum()) * b * b
        if kept.sum() < kept.numel() and nnz >= BLOCK_FILL * covered:
            return Pattern(f"block({b},{b})", "block", density, block=(b, b))
    return Pattern("unstructured", "unstructured", density)
