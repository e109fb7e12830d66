"""How much of each layer to prune, given a target sparsity for all of them together.

- "uniform": every layer at the target.
- "global": one magnitude threshold over all layers (global magnitude pruning), with a per-layer
  ceiling `max_layer_sparsity` so that no layer collapses (default: each layer keeps at least a
  quarter of the target density, e.g. <= 87.5% sparse at a 50% target).
- "lamp" (Lee et al. 2021): one threshold over layer-adaptive magnitude scores
  score(u) = w_u^2 / sum_{v >= u} w_v^2 (weights of a layer sorted by magnitude); no
  hyper-parameters, and every layer keeps its largest weight.
- "owl" (Yin et al. 2024, outlier-weighted layerwise sparsity): layers (transformer blocks when the
  model has them) with more outliers of the Wanda score |W| * ||x|| (entries above `owl_m` times
  their block's mean) are pruned less: densities are spread linearly over [-owl_lambda, +owl_lambda]
  around the target by outlier ratio. Needs calibration.

All allocations hold the parameter-weighted mean sparsity at the target (up to rounding). Global
thresholds are found by bisection on per-layer quantile sketches (4096 points), so memory stays
at one layer's scores at a time."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

ALLOCATIONS = ("uniform", "global", "lamp", "owl")
SKETCH_POINTS = 4096


def check_allocation(allocation: str) -> str:
    if not isinstance(allocation, str) or allocation.lower() not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
    return allocation.lower()


def _sketch(sorted_scores: torch.Tensor) -> torch.Tensor:
    """SKETCH_POINTS quantiles of an ascending score vector (its inverse CDF on a uniform grid)."""
    n = sorted_scores.numel()
    if n <= SKETCH_POINTS:
        return sorted_scores.double().cpu()
    idx = torch.linspace(0, n - 1, SKETCH_POINTS, device=sorted_scores.device).round().long()
    return sorted_scores[idx].double().cpu()


def _fraction_below(sketch: torch.Tensor, threshold: float) -> float:
    return float(torch.searchsorted(sketch, torch.tensor([threshold], dtype=torch.float64), right=False)) / len(sketch)


def _threshold_allocation(sketches: Mapping[str, torch.Tensor], sizes: Mapping[str, int], sparsity: float,
                          cap: float) -> dict[str, float]:
    """Per-layer sparsity min(fraction of scores below t, cap), t bisected so the weighted mean is
    the target."""
    total = sum(sizes.values())
    target = sparsity * total
    if sum(cap * sizes[n] for n in sizes) <= target:
        return dict.fromkeys(sizes, cap)
    lo = min(float(s[0]) for s in sketches.values())
    hi = max(float(s[-1]) for s in sketches.values())
    lo, hi = lo - 1.0 - abs(lo), hi + 1.0 + abs(hi)

    def pruned(t: float) -> float:
        return sum(min(_fraction_below(sketches[n], t), cap) * sizes[n] for n in sizes)

    for _ in range(100):
        mid = (lo + hi) / 2
        if pruned(mid) < target:
            lo = mid
        else:
            hi = mid
    return {n: min(_fraction_below(sketches[n], hi), cap) for n in sizes}


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """Ascending LAMP scores of one layer: w_u^2 / sum_{v >= u} w_v^2 over |w| sorted ascending."""
    sq = weight.detach().float().flatten().square().sort().values
    suffix = sq.flip(0).cumsum(0).flip(0)
    return (sq / suffix.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0, 1)


def default_cap(sparsity: float) -> float:
    return min(0.999, 1 - (1 - sparsity) / 4)


def uniform(layers: Mapping[str, nn.Linear], sparsity: float) -> dict[str, float]:
    return dict.fromkeys(layers, float(sparsity))


def global_magnitude(layers: Mapping[str, nn.Linear], sparsity: float,
                     max_layer_sparsity: float | None = None) -> dict[str, float]:
    cap = default_cap(sparsity) if max_layer_sparsity is None else max_layer_sparsity
    sketches = {n: _sketch(m.weight.detach().float().abs().flatten().sort().values) for n, m in layers.items()}
    return _threshold_allocation(sketches, {n: m.weight.numel() for n, m in layers.items()}, sparsity, cap)


def lamp(layers: Mapping[str, nn.Linear], sparsity: float, max_layer_sparsity: float | None = None) -> dict[str, float]:
    cap = 1.0 if max_layer_sparsity is None else max_layer_sparsity
    sketches = {n: _sketch(lamp_scores(m.weight)) for n, m in layers.items()}
    return _threshold_allocation(sketches, {n: m.weight.numel() for n, m in layers.items()}, sparsity, cap)


def check_owl(owl_m, owl_lambda) -> None:
    if isinstance(owl_m, bool) or not isinstance(owl_m, (int, float)) or not 0 < owl_m < math.inf:
        raise ValueError(f"owl_m must be a number > 0 (outliers: scores above owl_m times the mean), got {owl_m!r}")
    if isinstance(owl_lambda, bool) or not isinstance(owl_lambda, (int, float)) or not 0 <= owl_lambda < 1:
        raise ValueError(f"owl_lambda must be a number in [0, 1) (the spread of sparsities), got {owl_lambda!r}")


def owl(layers: Mapping[str, nn.Linear], sparsity: float, input_sq_sums: Mapping[str, torch.Tensor],
        groups: Mapping[str, str] | None = None, owl_m: float = 5.0, owl_lambda: float = 0.08,
        max_layer_sparsity: float | None = None) -> dict[str, float]:
    """`input_sq_sums[name]` [in]: sum over calibration tokens of x_j^2; `groups[name]`: the unit that
    shares one sparsity (a transformer block); every layer is its own unit when None."""
    check_owl(owl_m, owl_lambda)
    groups = groups or {n: n for n in layers}
    above: dict[str, int] = {}
    count: dict[str, int] = {}
    total_sum: dict[str, float] = {}
    for n, m in layers.items():  # the mean is over the unit, so two passes: sums first
        score = m.weight.detach().float().abs() * input_sq_sums[n].float().to(m.weight.device).sqrt()[None, :]
        g = groups[n]
        total_sum[g] = total_sum.get(g, 0.0) + float(score.sum(dtype=torch.float64))
        count[g] = count.get(g, 0) + score.numel()
    for n, m in layers.items():
        score = m.weight.detach().float().abs() * input_sq_sums[n].float().to(m.weight.device).sqrt()[None, :]
        g = groups[n]
        above[g] = above.get(g, 0) + int((score > owl_m * total_sum[g] / count[g]).sum())
    units = list(count)
    ratio = torch.tensor([above[g] / count[g] for g in units], dtype=torch.float64)
    spread = ratio.max() - ratio.min()
    scaled = (ratio - ratio.min()) / spread * 2 * owl_lambda if spread > 0 else torch.zeros_like(ratio)
    weights = torch.tensor([count[g] for g in units], dtype=torch.float64)
    deviation = scaled - (scaled * weights).sum() / weights.sum()  # (weighted mean 0: the target holds)
    cap = 1.0 if max_layer_sparsity is None else max_layer_sparsity
    # The deviations shrink (all by one factor, so the weighted mean stays the target) where the full
    # spread would take a unit's density above 1 or below max(1 - cap, half the mean): clamped one
    # by one, a high target (0.95) missed the target and pruned whole blocks to nothing.
    mean, floor = 1 - sparsity, max(1 - cap, (1 - sparsity) / 2)
    factor = 1.0
    if float(deviation.max()) > 0:
        factor = min(factor, (1 - mean) / float(deviation.max()))
    if float(deviation.min()) < 0:
        factor = min(factor, max(0.0, mean - floor) / -float(deviation.min()))
    density = mean + factor * deviation
    unit_sparsity = {g: float((1 - d).clamp(0, cap)) for g, d in zip(units, density, strict=True)}
    return {n: unit_sparsity[groups[n]] for n in layers}
