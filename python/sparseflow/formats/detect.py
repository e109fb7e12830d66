"""Which compressed format a weight's zeros allow."""

from __future__ import annotations

import torch

from ._bits import group_codes, popcount, row_chunks
from .base import check_weight, densified
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

    def __getnewargs__(self):  # so copy, deepcopy and pickle rebuild the details too
        return str(self), self.kind, self.density, self.n, self.m, self.block

    def __repr__(self) -> str:
        return f"Pattern({str(self)!r}, density={self.density:.4f})"


BLOCK_SIDES = (4, 8, 16, 32, 64, 128)
BLOCK_FILL = 0.9  # a block pattern's kept blocks are at least this full
NM_FILL = 0.75  # an n:m pattern's n slots per group are at least this full on average


def detect_pattern(w: torch.Tensor) -> Pattern:
    """The most structured pattern the weight satisfies:

    - "dense": no zeros;
    - "n:m" (n <= m/2, m in 4, 8, 16; smallest m first): no group of m has more than n non-zeros,
      and the weight holds at least 75% of the n/m non-zeros an n:m weight of its shape holds (so a
      95%-sparse random weight is not called 8:16);
    - "block(bm,bk)" (sides powers of two from 4 to 128, rectangular too): some blocks are all
      zero and the kept ones are >= 90% full; of those that qualify, the largest block, then the
      squarest, then the taller;
    - else "unstructured" (an all-zero weight included).

    A -0.0 counts as zero. Torch sparse tensors (COO, CSR, BSR...) are read densified."""
    w = check_weight(densified(w))
    rows, cols = w.shape
    nm_sides = [m for m in (4, 8, 16) if cols >= m]
    # One pass in row chunks: non-zero count, the fullest group for each m, kept 4x4 blocks.
    nnz = 0
    fullest = dict.fromkeys(nm_sides, 0)
    kept4 = []
    for s in row_chunks(rows, cols, multiple=4, device=w.device):
        nonzero = w[s] != 0
        nnz += int(nonzero.sum())
        for m in nm_sides:
            padded = torch.nn.functional.pad(nonzero, (0, (-cols) % m))
            fullest[m] = max(fullest[m], int(popcount(group_codes(padded, m)).max()))
        kept4.append(BSR.blocked(nonzero, (4, 4)).transpose(1, 2).any(-1).any(1))
    density = nnz / w.numel()
    if nnz == w.numel():
        return Pattern("dense", "dense", 1.0)
    if nnz == 0:
        return Pattern("unstructured", "unstructured", 0.0)
    for m in nm_sides:
        n = fullest[m]
        if 2 * n <= m and nnz >= NM_FILL * n * w.numel() / m:
            return Pattern(f"{n}:{m}", "n:m", density, n=n, m=m)
    best = None
    for bm, bk, kept in _kept_blocks(torch.cat(kept4)):
        if rows < bm or cols < bk:
            continue
        count = int(kept.sum())
        if count < kept.numel() and nnz >= BLOCK_FILL * _covered(kept, bm, bk, rows, cols):
            # Largest, then squarest (sides' log2 closest), then taller.
            rank = (bm * bk, -abs(bm.bit_length() - bk.bit_length()), bm)
            if best is None or rank > best[0]:
                best = (rank, (bm, bk))
    if best is not None:
        bm, bk = best[1]
        return Pattern(f"block({bm},{bk})", "block", density, block=(bm, bk))
    return Pattern("unstructured", "unstructured", density)


def _covered(kept: torch.Tensor, bm: int, bk: int, rows: int, cols: int) -> int:
    """Elements of the weight inside kept blocks (edge blocks count only their part in the weight)."""
    row_sizes = (rows - torch.arange(kept.shape[0], device=kept.device) * bm).clamp(max=bm)
    col_sizes = (cols - torch.arange(kept.shape[1], device=kept.device) * bk).clamp(max=bk)
    return int(((kept.to(torch.int64) * col_sizes).sum(1) * row_sizes).sum())


def _kept_blocks(kept4: torch.Tensor):
    """(bm, bk, kept grid) for every block in BLOCK_SIDES x BLOCK_SIDES, from the grid of kept 4x4
    blocks: each grid is an OR over pairs of cells of a grid with one side half as long."""
    grids = {(4, 4): kept4}
    for bm in BLOCK_SIDES:
        for bk in BLOCK_SIDES:
            if (bm, bk) != (4, 4):
                src, pair = (grids[bm // 2, bk], (2, 1)) if bm > 4 else (grids[bm, bk // 2], (1, 2))
                grids[bm, bk] = BSR.blocked(src, pair).any(-1).any(-1)
            yield bm, bk, grids[bm, bk]
