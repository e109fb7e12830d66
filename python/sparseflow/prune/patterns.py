"""Sparsity patterns a pruner can produce, and the masks that realise them from importance scores.

A mask is a bool tensor shaped like the weight [out, in], True where a weight is kept. Every
pruning method computes its own scores (|W|, |W| * ||x||, OBS saliency) and hands them here, so
each method honours each pattern in the same way:

- "unstructured": drop the lowest-scoring fraction, compared over the whole layer or per row;
- "n:m": keep the n highest scores of every m consecutive inputs of each row (a row length that is
  not a multiple of m ends in a partial group, which keeps min(n, its length));
- "block(bm,bk)": score each aligned bm x bk tile by its summed scores and drop whole tiles;
- "neurons" / "heads": structured, handled by `structured.py` (whole rows and columns).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..formats.bsr import check_block

STRUCTURED = ("neurons", "heads")


@dataclass(frozen=True)
class PatternSpec:
    """A parsed pattern: kind is "unstructured" | "n:m" | "block" | "neurons" | "heads"."""

    kind: str
    n: int | None = None
    m: int | None = None
    block: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block({self.block[0]},{self.block[1]})"
        return self.kind

    @property
    def structured(self) -> bool:
        return self.kind in STRUCTURED

    @property
    def fixed_sparsity(self) -> float | None:
        """n:m fixes the sparsity at 1 - n/m; other patterns take it from the caller."""
        return 1 - self.n / self.m if self.kind == "n:m" else None


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*block\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$", re.IGNORECASE)


def parse_pattern(pattern) -> PatternSpec:
    """"unstructured", "2:4" or any "n:m" with 0 < n < m, "block(bm,bk)" (sides powers of two up to
    128, what sf.BSR stores), "neurons", "heads". A PatternSpec passes through. Raises ValueError
    naming what is wrong."""
    if isinstance(pattern, PatternSpec):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string such as 'unstructured', '2:4' or 'block(32,32)', got {pattern!r}")
    text = pattern.strip().lower()
    if text in ("unstructured", "neurons", "heads"):
        return PatternSpec(text)
    if (match := _NM.match(text)) is not None:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r}: n:m needs 0 < n < m, got n={n}, m={m}")
        return PatternSpec("n:m", n=n, m=m)
    if (match := _BLOCK.match(text)) is not None:
        try:
            block = check_block((int(match.group(1)), int(match.group(2))))
        except ValueError as e:
            raise ValueError(f"pattern {pattern!r}: {e}") from None
        return PatternSpec("block", block=block)
    raise ValueError(
        f"unknown pattern {pattern!r}: expected 'unstructured', 'n:m' (e.g. '2:4', '4:8'), 'block(bm,bk)' "
        f"(e.g. 'block(32,32)'), 'neurons' or 'heads'"
    )


def _clean(scores: torch.Tensor) -> torch.Tensor:
    # NaN scores rank highest: a NaN weight is kept rather than silently zeroed (matches sf.NM prune=True).
    return scores.float().nan_to_num(nan=float("inf"))


def count_to_prune(total: int, sparsity: float) -> int:
    """round(sparsity * total), leaving at least one where sparsity < 1 (0.999 of a 64-wide row
    rounds to all 64)."""
    return min(total - (1 if sparsity < 1 and total else 0), max(0, int(round(total * float(sparsity)))))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k lowest entries in each row of a 2-D tensor (ties broken by position).
    kthvalue (a selection, O(n)) rather than topk: topk with k ~ n/2 sorts, and is 5-30x slower."""
    rows, n = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    thresh = scores.kthvalue(k, dim=1, keepdim=True).values
    low = scores < thresh
    missing = k - low.sum(1, keepdim=True)
    ties = scores == thresh
    return low | (ties & (ties.cumsum(1) <= missing))


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep all but the round(sparsity * count) lowest scores of the layer (or of each row)."""
    s = _clean(scores)
    if per_row:
        return ~lowest_k(s, count_to_prune(s.shape[1], sparsity))
    return ~lowest_k(s.reshape(1, -1), count_to_prune(s.numel(), sparsity)).view_as(s)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive columns of each row."""
    s = _clean(scores)
    rows, cols = s.shape
    pad = (-cols) % m
    if pad:  # missing columns of the partial last group score -inf, so real columns are kept first
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
    grouped = s.view(rows, -1, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, grouped.topk(n, dim=2).indices, True)
    return mask.view(rows, -1)[:, :cols]


def block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows, cols] -> [ceil(rows / bm), ceil(cols / bk)] sums over aligned tiles (edges zero-padded)."""
    bm, bk = block
    s = _clean(scores)
    rows, cols = s.shape
    s = torch.nn.functional.pad(s, (0, (-cols) % bk, 0, (-rows) % bm))
    return s.view(s.shape[0] // bm, bm, s.shape[1] // bk, bk).sum(dim=(1, 3))


def expand_blocks(kept: torch.Tensor, block: tuple[int, int], shape) -> torch.Tensor:
    bm, bk = block
    return kept.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[: shape[0], : shape[1]].contiguous()


def block_mask(scores: torch.Tensor, sparsity: float, block: tuple[int, int], per_row: bool = False,
               carry: list[float] | None = None) -> torch.Tensor:
    """Drop whole bm x bk tiles, lowest mean score first, until round(sparsity * weights) weights
    of the layer (or of each row of tiles, when per_row) are dropped, as near as whole tiles allow.
    Edge tiles of a shape that is not a multiple of the block hold fewer weights and count so. Each
    row's rounding is carried into the next one (rounded alike in every row, the errors added up: a
    layer at 0.9 came out all zeros), and `carry`, a one-element list, takes it from one call to the
    next (SparseGPT's column blocks of a layer). Below sparsity 1, a layer keeps at least one tile."""
    rows, cols = scores.shape
    sums = block_scores(scores, block)
    sizes = block_scores(torch.ones(rows, cols, device=scores.device), block)
    means = sums / sizes
    if not per_row:
        means, sizes = means.reshape(1, -1), sizes.reshape(1, -1)
    order = means.argsort(dim=1, stable=True)
    cum = sizes.gather(1, order).cumsum(1)
    cum = torch.cat([torch.zeros_like(cum[:, :1]), cum], dim=1).tolist()  # weights dropped by the k lowest tiles
    targets = (sizes.sum(1) * float(sparsity)).tolist()
    left = carry[0] if carry is not None else 0.0
    counts = []
    for row_cum, target in zip(cum, targets, strict=True):  # how many tiles to drop in each row
        want = target + left
        k = min(range(len(row_cum)), key=lambda i: abs(row_cum[i] - want))
        left = want - row_cum[k]
        counts.append(k)
    if carry is not None:
        carry[0] = left
    k = torch.tensor(counts, device=order.device)[:, None]
    drop_sorted = torch.arange(order.shape[1], device=order.device)[None, :] < k
    kept = torch.ones_like(drop_sorted).scatter_(1, order, ~drop_sorted)
    if carry is None and sparsity < 1 and not bool(kept.any()):
        kept.view(-1)[means.argmax()] = True  # (the tile of the highest mean score)
    kept = kept.view(block_scores(scores, block).shape)
    return expand_blocks(kept, block, scores.shape)


def select_mask(scores: torch.Tensor, spec: PatternSpec, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """The keep-mask of `spec` at `sparsity` (ignored for n:m) from importance scores [out, in]."""
    if spec.kind == "unstructured":
        return unstructured_mask(scores, sparsity, per_row)
    if spec.kind == "n:m":
        return nm_mask(scores, spec.n, spec.m)
    if spec.kind == "block":
        return block_mask(scores, sparsity, spec.block, per_row)
    raise ValueError(f"pattern {spec} is structured: prune it with prune(..., pattern={str(spec)!r})")


def satisfies(weight: torch.Tensor, spec: PatternSpec) -> bool:
    """Whether `weight` has at most n non-zeros in every group of m (n:m); True for other patterns,
    whose zeros any weight can hold (check a block mask with tiles_whole)."""
    if spec.kind != "n:m":
        return True
    nonzero = weight != 0
    cols = nonzero.shape[1]
    padded = torch.nn.functional.pad(nonzero, (0, (-cols) % spec.m))
    return bool((padded.view(padded.shape[0], -1, spec.m).sum(-1) <= spec.n).all())


def tiles_whole(mask: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether a keep-mask keeps or drops each aligned bm x bk tile as a whole."""
    kept = block_scores(mask.float(), block)
    full = block_scores(torch.ones_like(mask, dtype=torch.float32), block)
    return bool(((kept == 0) | (kept == full)).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())


def round_units(total: int, sparsity: float, keep_at_least: int = 1) -> int:
    """How many of `total` structural units (neurons, heads) to remove at `sparsity`."""
    return max(0, min(total - keep_at_least, int(math.floor(total * float(sparsity) + 0.5))))
