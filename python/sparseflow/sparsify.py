"""sparsify(model): swap each nn.Linear for the sparse module that was measured fastest on this
machine, or leave it dense. Works in place and returns a per-layer report."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from . import dispatch
from .formats import detect_pattern
from .io.inputs import check_module, compress, dense_weight, effective_tensor, finds_ratio, parse_format
from .nn import ActSparseLinear, SparseLinear, input_modes, threshold_for
from .prune.capture import call_model
from .prune.oneshot import _as_list, name_matches

DEFAULT_EXCLUDE = ("lm_head", "*.lm_head")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    pattern: str
    density: float
    choice: str                  # format kept ("dense" when sparse lost), or "act-sparse(...)"
    backend: str
    bytes_before: int
    bytes_after: int
    speedup: dict[int, float] = field(default_factory=dict)  # rows of x -> dense time / chosen time
    note: str = ""


@dataclass
class SparsifyReport:
    layers: list[LayerReport]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def to_json(self) -> str:
        return json.dumps({"layers": [asdict(layer) for layer in self.layers], "bytes_before": self.bytes_before,
                           "bytes_after": self.bytes_after, "slower_than_dense": self.slower_than_dense()}, indent=1)

    def __str__(self) -> str:
        head = f"{'layer':<40} {'shape':>12} {'pattern':>13} {'density':>8} {'choice':>18} {'MB':>13}  speedup"
        lines = [head]
        for r in self.layers:
            sp = " ".join(f"m{m}:{s:.2f}x" for m, s in sorted(r.speedup.items()))
            mb = f"{r.bytes_before / 2**20:.1f}->{r.bytes_after / 2**20:.1f}"
            lines.append(f"{r.name[-40:]:<40} {'x'.join(map(str, r.shape)):>12} {r.pattern:>13} {r.density:>8.3f} "
                         f"{r.choice:>18} {mb:>13}  {sp}{'  ' + r.note if r.note else ''}")
        lines.append(f"total: {self.bytes_before / 2**20:.1f} MB -> {self.bytes_after / 2**20:.1f} MB")
        slower = self.slower_than_dense()
        if slower:
            lines.append("slower than dense where measured: " + ", ".join(
                f"m{m}: {len(s)} layer{'s' if len(s) > 1 else ''} ({min(s):.2f}-{max(s):.2f}x)"
                for m, s in sorted(slower.items())) + "; prefill='auto' keeps dense copies for such layers")
        return "\n".join(lines)

    def slower_than_dense(self) -> dict[int, list[float]]:
        """Row count -> the measured speedups below 1 of the sparse layers kept (what prefill="batched"
        trades for memory)."""
        out: dict[int, list[float]] = {}
        for layer in self.layers:
            for m, s in layer.speedup.items():
                if layer.choice != "dense" and s < 1.0:
                    out.setdefault(m, []).append(s)
        return out

    __repr__ = __str__


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """As sf.prune matches: a glob the full name, a plain string whole dotted components."""
    return any(name_matches(name, p) for p in patterns)


def _act_target(activation_sparsity, name: str) -> float | None:
    """The activation sparsity asked of layer `name`: the fraction, or a dict's entry for the name or
    its first pattern that matches it (None: none asked)."""
    if not isinstance(activation_sparsity, dict):
        return activation_sparsity
    if name in activation_sparsity:
        return activation_sparsity[name]
    return next((v for k, v in activation_sparsity.items() if _matches(name, [k])), None)


def _tied(model: nn.Module) -> set[int]:
    """Storage of parameters used by more than one module (tied embeddings / lm_head)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def target_linears(model: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """include / exclude: a name pattern or a list of them, as sf.prune takes them (a string was read
    character by character, and a generator was used up by the first layer)."""
    include = None if include is None else _as_list(include)
    exclude = _as_list(exclude)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude) or (include is None and _matches(name, DEFAULT_EXCLUDE)):
            continue
        out.append((name, module))
    return out


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module is reachable under (a module used twice has two)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(id(module), []).append(name)
    return out


# Modules that read their Linear children's .weight themselves (fused attention and transformer
# fast paths) instead of calling them: a sparse module there would break them, so those stay dense.
READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _weight_read_by_parent(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else model, READS_CHILD_WEIGHTS)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def candidates_for(w: torch.Tensor, format: str) -> dict[str, object]:
    """Format label -> compressed weight, for the formats the weight's pattern allows."""
    if format != "auto":
        fmt = compress(w, format)
        return {f"{fmt.n}:{fmt.m}" if finds_ratio(format) else format: fmt}  # the ratio found
    pattern = detect_pattern(w)
    if pattern.kind == "dense":
        labels = []
    elif pattern.kind == "n:m":
        labels = [str(pattern), "bitmask"]
    elif pattern.kind == "block":
        labels = [f"block({pattern.block[0]},{pattern.block[1]})", "bitmask"]
    else:
        labels = ["bitmask", "csr"] if pattern.density <= 0.2 else ["bitmask"]
    return {label: compress(w, label) for label in labels}


def capture_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]], calibration, max_rows: int = 4096):
    """Inputs of each layer over the calibration batches, [rows, in_features] (subsampled)."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: store[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float())) for name, m in layers]
    if isinstance(calibration, (torch.Tensor, Mapping)):  # one batch, as sf.prune takes it
        calibration = [calibration]
    try:
        with torch.no_grad():
            for batch in calibration:
                call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, chunks in store.items():
        if not chunks:
            raise ValueError(f"calibration never reached layer {name!r}")
        x = torch.cat(chunks)
        if not x.shape[0]:
            raise ValueError(f"calibration gave layer {name!r} no rows of input")
        if not bool(torch.isfinite(x).all()):  # an inf would make its mode (the shift) and its bias inf
            raise ValueError(f"calibration inputs of layer {name!r} hold inf or NaN: thresholds need finite "
                             "activations")
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]]
        out[name] = x
    return out


def crossover(kernel: dict[int, float], batched: dict[int, float], m_range: tuple[int, ...]) -> int | None:
    """`dense_above` of a layer: the last row count (in increasing order) before the first one where
    the batched path measured faster than the sparse kernel; None when the kernel wins (or nothing
    was measured) at every row count."""
    last = None
    for m in sorted(m_range):
        if m in kernel and m in batched and batched[m] > kernel[m]:
            return last if last is not None else m - 1
        last = m
    return None


# Timings that place a crossover more finely: between two row counts of m_range where the winner
# changes, the crossover is bisected (geometrically) this many times. Unrefined, m_range=(1, 512)
# sent a MiniLM sentence's 12 rows to the batched path, which won at 512: 0.63x of dense, against
# 1.27x on the kernel (fp32, 50% unstructured).
REFINE_STEPS = 3


def refine_crossover(kernel: dict[int, float], batched: dict[int, float], m_range: tuple[int, ...],
                     measure_at, steps: int = REFINE_STEPS) -> tuple[int, ...]:
    """Bisects between the last row count where the kernel measured faster and the first where the
    batched path did (see crossover), `steps` times at most, timing both at the geometric middle:
    measure_at(m) -> (kernel speedup, batched speedup), either None where not measured. Adds those
    to `kernel` and `batched` and returns m_range with the row counts it measured."""
    rows = sorted(set(m_range))
    for _ in range(steps):
        flip = next((i for i, m in enumerate(rows) if m in kernel and m in batched and batched[m] > kernel[m]), None)
        if not flip:  # the kernel wins everywhere, or loses from the first row count: nothing to bisect
            break
        lo, hi = rows[flip - 1], rows[flip]
        if hi - lo < 2:
            break
        mid = min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)
        k, b = measure_at(mid)
        if k is None or b is None:
            break
        kernel[mid], batched[mid] = k, b
        rows = sorted({*rows, mid})
    return tuple(rows)


def _measure_at(measure, *args, label: str | None = None, **kwargs):
    """refine_crossover's measure_at: measure(*args, (m,), **kwargs) at one row count m, with
    dispatch.measure_paths (its timings are per format: `label`) or dispatch.measure_act."""
    def at(m: int) -> tuple[float | None, float | None]:
        timed = measure(*args, (m,), **kwargs)
        kernel, batched = (timed["kernel"], timed["batched"]) if label is None else (timed["kernel"][label],
                                                                                     timed["batched"][label])
        return kernel.get(m), batched.get(m)
    return at


# prefill="auto" keeps a dense copy where a layer's path measured below this fraction of dense's
# speed: closer ratios are within this machine's timing noise (+-3% between runs of the same case).
# An activation-sparse batch does dense's arithmetic and more (the threshold, and repacking the
# transposed weight), so for those layers any ratio below 1 counts.
SLOWER, SLOWER_ACT = 0.97, 1.0


@dataclass
class Plan:
    """What a sparse layer runs by rows of x: its kernel up to `dense_above` rows, then the
    batched path, or F.linear on a dense copy with `keep_dense`."""

    dense_above: int | None
    keep_dense: bool
    speedup: dict[int, float]
    note: str
    kernel: str = "cpp"  # the backend row of the kernel (on a GPU: "cuda", "triton", "torch")

    @property
    def backend(self) -> str:
        return self.kernel if self.dense_above is None else self.kernel + ("+dense" if self.keep_dense else "+batched")


def plan_rows(kernel: dict[int, float], batched: dict[int, float], m_range: tuple[int, ...], prefill: str,
              slower: float = SLOWER) -> Plan:
    """The Plan for a layer whose kernel and batched path measured these speedups over dense. A
    path measured at 0 cannot run at all where it would be used (inside a CUDA graph, with
    cuda_graphs=True): then the layer keeps a dense copy for those rows, whatever `prefill` says."""
    dense_above = crossover(kernel, batched, m_range)
    speed = {m: s if dense_above is None or m <= dense_above else batched.get(m, s) for m, s in kernel.items()}
    slow = {m: s for m, s in speed.items() if s < slower}
    runs_everywhere = all(s > 0.0 for s in speed.values())
    if (prefill == "batched" and runs_everywhere) or (prefill == "auto" and not slow):
        return Plan(dense_above, False, speed, f"batched above {dense_above} rows" if dense_above is not None else "")
    above = crossover(kernel, {m: 1.0 for m in m_range}, m_range)  # dense itself is the other path
    above = max(m_range) if above is None else above  # and it takes every row count not measured
    why = "" if prefill == "dense" else " (else " + ", ".join(f"m{m}: {s:.2f}x" for m, s in sorted(slow.items())) + ")"
    return Plan(above, True, {m: s if m <= above else 1.0 for m, s in kernel.items()},
                f"dense copy above {above} rows{why}")


def plan_layer(kernel: dict[int, float], batched: dict[int, float], m_range: tuple[int, ...], prefill: str,
               measure_at, slower: float = SLOWER) -> Plan:
    """plan_rows on the timings at m_range, with crossovers bisected (refine_crossover): first where
    the batched path starts to beat the kernel; then, for a layer that keeps a dense copy, where
    dense does. Unrefined, a kernel that won at 1 row and lost at 16 sent every row count from 2 to
    the copy (a batch of 4 at 1.0x instead of the kernel's 1.4x). Adds the timings it takes to
    `kernel` and `batched`."""
    rows = refine_crossover(kernel, batched, m_range, measure_at)
    plan = plan_rows(kernel, batched, rows, prefill, slower)
    if not plan.keep_dense:
        return plan

    def against_dense(m: int) -> tuple[float | None, float | None]:
        k, b = measure_at(m)
        if b is not None:
            batched[m] = b
        return k, 1.0

    dense = {m: 1.0 for m in rows}
    rows = refine_crossover(kernel, dense, rows, against_dense)
    return plan_rows(kernel, batched, rows, prefill, slower)


def sparsify(model: nn.Module, format: str = "auto", include=None, exclude=None, activation_sparsity=None,
             calibration=None, m_range: tuple[int, ...] = (1, 16, 128), mode_centering: bool = False,
             measure: bool = True, use_cache: bool = True, remeasure: bool = False,
             prefill: str = "batched", cuda_graphs: bool = False) -> SparsifyReport:
    """Replaces nn.Linear layers in place.

    format: "auto" measures every format the weight's pattern allows against dense at each row count
      in `m_range` and keeps the fastest only if it beats dense at m_range[0]. A named format
      ("bitmask", "2:4", "n:m" for the ratio each weight has, ...) is applied as asked; a layer whose
      pattern it does not allow, or that sparseflow cannot hold (float64, empty, meta weights), stays
      dense with a note. Either way the sparse kernel is also timed against the batched path
      (decompression in cache-sized chunks + dense GEMM): from the first row count where the batched
      path is faster, the layer runs it (`dense_above`). Between two row counts where the winner
      changes, the crossover is bisected with a few more timings (REFINE_STEPS; activation-sparse
      layers too; for a layer that keeps a dense copy, also where dense starts to beat its kernel),
      which the report lists with the others.
    m_range: the row counts of x to measure at: decode (1), a small batch (16), a prefill (128).
    use_cache / remeasure: timings are cached on disk per machine and case (sparseflow.dispatch);
      `remeasure=True` ignores the cached ones (say, taken on a loaded machine) and overwrites them.
    cuda_graphs: on a GPU, time layers as CUDA graphs replay them (serving engines, torch.compile's
      mode="reduce-overhead"), for models that will run that way. Eager PyTorch on a GPU is bound by
      the host's launches at decode, and a sparse layer's launch costs more than F.linear's, so
      timed eagerly (the default) few layers win there; a path that cannot be captured never wins.
      Ignored on the CPU.
    activation_sparsity: a fraction (per-layer TEAL thresholds calibrated for that target) or a dict
      {layer name or pattern: fraction}; needs `calibration`, an iterable of model inputs.
    mode_centering: SCAP: shift inputs by their calibrated mode before thresholding (folded into bias).
    prefill: what runs where the sparse kernel loses (many rows of x). "batched" (default) keeps only
      the compressed weight: above the crossover it decompresses it in chunks for torch's dense GEMM
      (or runs the kernel's own batch GEMM, where that measured faster): the smallest model, up to
      10% slower than dense there. "dense" keeps a dense copy of each sparse layer's weight for those
      rows (from the first measured row count where dense beat the kernel, and above the largest one
      measured): never slower than dense at any row count, for the memory of the copies (rebuilt on
      load, never saved). "auto" keeps a copy only for the layers that need one: "batched" unless
      that measured more than 3% slower than dense at a row count of `m_range` (activation-sparse
      layers: slower at all, as their batches do dense's arithmetic and more), then "dense"
      (without measurements: "batched"): never slower where measured, with the fewest copies.
      Activation-sparse layers with a copy run their dense product on those rows, without
      thresholding (activation sparsity at decode only, as in TEAL).
    Activation-sparse layers are measured too (for their target fraction of skipped inputs): one
    that loses to dense at m_range[0] is left dense.
    Embeddings, lm_head and tied weights are left alone unless named in `include`."""
    check_module(model, "sf.sparsify")
    if format != "auto" and not finds_ratio(format):
        parse_format(format)  # a name that is no format raises here, before any layer is touched
    if m_range is None or len(m_range) == 0 or any(int(m) < 1 for m in m_range):
        raise ValueError(f"m_range must list row counts >= 1, got {m_range!r}")
    m_range = tuple(int(m) for m in m_range)
    if prefill not in ("auto", "batched", "dense"):
        raise ValueError(f"prefill must be 'auto', 'batched' or 'dense', got {prefill!r}")
    layers = target_linears(model, include, exclude)
    aliases = _aliases(model)
    read_by_parent = {name for name, _ in layers if _weight_read_by_parent(model, name)}
    tied = _tied(model)
    acts = None
    if activation_sparsity is not None:
        if calibration is None:
            raise ValueError("activation_sparsity needs calibration batches to set the thresholds")
        targets = activation_sparsity.values() if isinstance(activation_sparsity, dict) else [activation_sparsity]
        for t in targets:  # checked before any layer is replaced
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t < 1.0:
                raise ValueError(f"activation sparsity must be a fraction in [0, 1), got {t!r}")
        acts = capture_inputs(model, [(n, lin) for n, lin in layers if n not in read_by_parent  # (a meta layer
                                      and not getattr(lin.weight, "is_meta", False)  # is left dense below)
                                      and _act_target(activation_sparsity, n) is not None], calibration)
    reports = []
    for name, lin in layers:
        # Layers sparseflow cannot hold (float64, empty, meta weights...) stay dense with a note:
        # no error may leave the model half converted.
        try:
            w = dense_weight(lin)
        except (TypeError, ValueError) as e:
            weight = getattr(lin, "weight", None)
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else (0, 0)
            before = weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) else 0
            reports.append(LayerReport(name=name, shape=shape, pattern="unsupported", density=1.0, bytes_before=before,
                                       choice="dense", backend="torch", bytes_after=before, note=f"left dense: {e}"))
            continue
        shape = (int(w.shape[0]), int(w.shape[1]))
        before = w.numel() * w.element_size()
        pattern = detect_pattern(w)
        base = dict(name=name, shape=shape, pattern=str(pattern), density=pattern.density, bytes_before=before)
        if lin.weight.data_ptr() in tied:
            reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before, note="tied weight"))
            continue
        if name in read_by_parent:
            parent = type(model.get_submodule(name.rpartition(".")[0])).__name__
            reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before,
                                       note=f"{parent} reads its weight directly"))
            continue
        target = _act_target(activation_sparsity, name)
        if target is not None:
            x = acts[name]
            shift = input_modes(x).to(w.dtype) if mode_centering else None
            thr = threshold_for(x, float(target), shift)
            wf = "bitmask" if pattern.density <= 0.7 else "dense"
            new = ActSparseLinear(w, effective_tensor(lin, "bias"), thr, shift, wf)
            if measure:
                timed = dispatch.measure_act(w, new.w_t(), wf, float(target), m_range, use_cache=use_cache,
                                             remeasure=remeasure, graphs=cuda_graphs)
                first = timed["kernel"].get(m_range[0])
                if first is not None and first < 1.0:
                    reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before,
                                               speedup={m: 1.0 for m in m_range},
                                               note=f"act-sparse measured slower ({first:.2f}x)"))
                    continue
                plan = plan_layer(timed["kernel"], timed["batched"], m_range, prefill, _measure_at(
                    dispatch.measure_act, w, new.w_t(), wf, float(target), use_cache=use_cache, remeasure=remeasure,
                    graphs=cuda_graphs), SLOWER_ACT)
                if plan.dense_above is None:  # the row kernel is for decode: unmeasured batches take the batch path
                    above = max(m_range) if max(m_range) > 1 else new.dense_above
                    plan = replace(plan, dense_above=above, note=f"batched above {above} rows (not measured there)")
            else:  # the module's default crossover
                plan = Plan(new.dense_above, prefill == "dense", {}, "")
            kernel = dispatch.default_backend("act_sparse_linear", new.w_t(), w, m_range[0])
            plan = replace(plan, kernel=kernel or plan.kernel)
            new.dense_above = plan.dense_above
            new._keep_dense(plan.keep_dense)
            after = sum(b.numel() * b.element_size() for b in new.buffers())
            note = f"threshold {thr:.4g}{', mode-centred' if shift is not None else ''}"
            reports.append(LayerReport(**base, choice=f"act-sparse({wf})", backend=plan.backend, bytes_after=after,
                                       speedup=plan.speedup, note=f"{note}; {plan.note}" if plan.note else note))
            for alias in aliases[id(lin)]:  # (a module used under two names is replaced under both)
                _set_module(model, alias, new)
            continue
        try:
            cands = candidates_for(w, format)
        except ValueError as e:  # a named format this layer's pattern does not allow (say 2:4)
            if format == "auto":
                raise
            reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before,
                                       note=f"left dense: {e}"))
            continue
        if not cands:
            reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before, note="no zeros"))
            continue
        if measure:
            timed = dispatch.measure_paths(w, cands, m_range, use_cache=use_cache, remeasure=remeasure,
                                           graphs=cuda_graphs)
        else:
            timed = {path: {k: {} for k in cands} for path in dispatch.PATHS}
        speed = timed["kernel"]
        label = max(cands, key=lambda c: speed[c].get(m_range[0], 1.0))
        first = speed[label].get(m_range[0])
        if format == "auto" and first is not None and first < 1.0:
            reports.append(LayerReport(**base, choice="dense", backend="torch", bytes_after=before,
                                       speedup={m: 1.0 for m in m_range},
                                       note=f"sparse measured slower ({label} {first:.2f}x)"))
            continue
        plan = plan_layer(speed[label], timed["batched"][label], m_range, prefill, _measure_at(  # (unmeasured: no
            dispatch.measure_paths, w, {label: cands[label]}, label=label, use_cache=use_cache, remeasure=remeasure,
            graphs=cuda_graphs))  # flip, so no more timings)
        plan = replace(plan, kernel=dispatch.default_backend("linear", cands[label], w, m_range[0]) or plan.kernel)
        new = SparseLinear(cands[label], effective_tensor(lin, "bias"), dense_above=plan.dense_above,
                           keep_dense=plan.keep_dense)
        reports.append(LayerReport(**base, choice=label, backend=plan.backend,
                                   bytes_after=cands[label].nbytes + (before if plan.keep_dense else 0),
                                   speedup=plan.speedup, note=plan.note))
        for alias in aliases[id(lin)]:
            _set_module(model, alias, new)
    return SparsifyReport(reports)
