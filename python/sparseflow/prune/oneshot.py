"""`prune(model, ...)`: one-shot pruning of a model's Linear layers, in place (zeros in the dense
weights; sf.sparsify compresses them later, sf.shrink removes structured units)."""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..io.inputs import check_module
from . import allocation as alloc
from .capture import Calibration, Hessian, SequentialPruner, SquaredNorms, collect_stats, find_blocks, module_device
from .criteria import magnitude_prune_, wanda_prune_
from .patterns import PatternSpec, parse_pattern, sparsity_of
from .report import LayerPruneReport, PruneReport
from .sparsegpt import DEFAULT_BLOCKSIZE, DEFAULT_DAMPENING, inverse_cholesky_upper, sparsegpt_prune_
from .structured import STRUCTURED_METHODS, StructuredStats, find_attention, find_mlps, prune_heads, prune_mlp

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt", "variance")
# Output heads and embeddings are left alone unless `include` names them: pruning them costs the
# most quality per weight, and a tied lm_head is the embedding table itself.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "pooler", "qa_outputs", "cls", "embed_out", "head",
                        "output_layer", "output_projection", "logits"})


def _as_list(patterns) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    try:
        out = list(patterns)
    except TypeError:
        out = [patterns]
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"include / exclude take a name pattern or a list of them, got {patterns!r}")
    return out


def name_matches(name: str, pattern: str) -> bool:
    """A glob ("*.mlp.*") matches the full name; a plain string matches whole dotted components
    ("mlp", "layers.3", "encoder.layer.0.attention")."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return re.search(rf"(^|\.){re.escape(pattern)}($|\.)", name) is not None


def _default_skip(name: str) -> bool:
    parts = name.split(".")
    return any(p in HEAD_NAMES or "embed" in p for p in parts)


def select_linears(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Linear]:
    """The nn.Linear modules to prune, by name, in module order. Without `include`, output heads
    (lm_head, classifier, pooler, score, ...), anything under an embedding, and any Linear whose
    weight is an embedding table (tied) are skipped. `include` / `exclude`: a name pattern or a list
    of them (see name_matches); exclude wins."""
    include, exclude = _as_list(include), _as_list(exclude)
    tied: set[int] = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # some models raise NotImplementedError here
            out = None
        if isinstance(out, nn.Linear):
            tied.add(id(out.weight))
    chosen: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include:
            if not any(name_matches(name, p) for p in include):
                continue
        elif _default_skip(name) or id(module.weight) in tied:
            continue
        if any(name_matches(name, p) for p in exclude):
            continue
        if hasattr(module, "weight_orig") or parametrize.is_parametrized(module, "weight"):
            # (its .weight is recomputed from the original and the mask at each forward: pruning it
            # would be undone, silently)
            raise ValueError(f"layer {name!r} holds a torch.nn.utils.prune mask or a parametrization of its weight: "
                             "fold it first (torch.nn.utils.prune.remove, parametrize.remove_parametrizations), "
                             "or pass it to sf.sparsify, which reads the effective weight")
        chosen[name] = module
    return chosen


def _check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0 <= s < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {s}")
    return s


def _check_cap(cap, sparsity: float, allocation: str, spec: PatternSpec) -> float | None:
    """max_layer_sparsity: None, or a number in (0, 1]; a warning where it cannot act or caps the target."""
    if cap is None:
        return None
    try:
        cap = float(cap)
    except (TypeError, ValueError):
        raise ValueError(f"max_layer_sparsity must be a number in (0, 1], got {cap!r}") from None
    if not 0 < cap <= 1:
        raise ValueError(f"max_layer_sparsity must be in (0, 1], got {cap}")
    if allocation == "uniform" or spec.kind == "n:m" or spec.structured:
        warnings.warn(f"max_layer_sparsity is ignored with allocation={allocation!r} and pattern={str(spec)!r}: every "
                      "layer gets the target sparsity", UserWarning, stacklevel=3)
    elif cap < sparsity:
        warnings.warn(f"max_layer_sparsity={cap} is below the target sparsity {sparsity}: no layer can reach it, so "
                      f"the model ends at {cap}", UserWarning, stacklevel=3)
    return cap


def _check_method(method, spec: PatternSpec) -> str:
    allowed = STRUCTURED_METHODS if spec.structured else METHODS
    if not isinstance(method, str) or method.lower() not in allowed:
        extra = " ('variance' is for pattern='neurons' / 'heads' only)" if method == "variance" else ""
        raise ValueError(f"unknown method {method!r} for pattern {str(spec)!r}: expected one of "
                         f"{', '.join(allowed)}{extra}")
    return method.lower()


def prune(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    calibration: Iterable | None = None,
    allocation: str = "uniform",
    include=None,
    exclude=None,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dampening: float = DEFAULT_DAMPENING,
    max_layer_sparsity: float | None = None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    progress: bool | None = None,
) -> PruneReport:
    """Prune `model`'s Linear layers in place and return a per-layer PruneReport.

    method: "magnitude" | "wanda" | "sparsegpt" ("variance" too for neurons / heads).
    sparsity: fraction of weights (or of neurons / heads per module) to remove; ignored by n:m.
    pattern: "unstructured" | "2:4" | any "n:m" | "block(bm,bk)" | "neurons" | "heads".
    calibration: an iterable of model inputs (tensors, dicts for transformers models, tuples; a
        single tensor or dict is one batch); needed by wanda, sparsegpt, variance and
        allocation="owl". Layers are pruned in execution order and each sees the already-pruned
        layers before it.
    allocation: "uniform" | "global" (global magnitude, per-layer ceiling) | "lamp" | "owl".
    owl_m, owl_lambda: OWL's outlier threshold (scores above owl_m times the block's mean) and spread
        of block sparsities (target +- owl_lambda; narrowed, the mean kept, where it would take a
        block's density above 1 or below half the target density).
    include / exclude: name patterns (see select_linears); heads and embeddings are skipped by default.
    blocksize, dampening: SparseGPT's lazy block width and Hessian dampening (fraction of mean diag).
    max_layer_sparsity: ceiling for non-uniform allocations (default for "global": keep >= 1/4 of
        the target density per layer).
    progress: None shows a progress bar on runs longer than 2 s, True always, False never."""
    check_module(model, "sf.prune")
    if isinstance(dampening, bool) or not isinstance(dampening, numbers.Real) or not 0 < dampening < math.inf:
        raise ValueError(f"dampening must be a positive fraction of the Hessian's mean diagonal, got {dampening!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if allocation == "owl":
        alloc.check_owl(owl_m, owl_lambda)  # (before the calibration passes)
    spec = parse_pattern(pattern)
    method = _check_method(method, spec)
    sparsity = _check_sparsity(sparsity)  # (an n:m pattern fixes it: the value given must still be one)
    if spec.kind == "n:m":
        sparsity = spec.fixed_sparsity or 0.0
    allocation = alloc.check_allocation(allocation)
    max_layer_sparsity = _check_cap(max_layer_sparsity, sparsity, allocation, spec)
    if calibration is None and (method in CALIBRATED or allocation == "owl"):
        what = f"method={method!r}" if method in CALIBRATED else "allocation='owl'"
        raise ValueError(f"{what} needs calibration data: pass calibration=<iterable of model inputs> (e.g. a few "
                         f"dozen tokenized batches); method='magnitude' needs none")
    if spec.structured:
        if allocation != "uniform":
            raise ValueError(f"pattern={str(spec)!r} supports allocation='uniform' only, got {allocation!r}")
        return _prune_structured(model, method, sparsity, spec, calibration, include, exclude, dampening, progress)
    layers = select_linears(model, include, exclude)
    if not layers:
        raise ValueError("no nn.Linear layer to prune (check include / exclude; heads and embeddings are skipped "
                         "by default)")
    needs_calibration = method != "magnitude" or allocation == "owl"
    calib = Calibration(model, calibration) if calibration is not None and needs_calibration else None
    targets = _allocate(model, layers, spec, sparsity, allocation, calib, max_layer_sparsity, owl_m, owl_lambda)
    # Calibrated methods prune one layer after another, each on the inputs the pruned ones before it
    # give: a layer whose inputs turn out unusable (inf from an fp16 overflow, say) fails after
    # others were pruned, so their weights are kept aside (on the CPU) until the whole model is done.
    kept = {name: layer.weight.detach().to("cpu", copy=True) for name, layer in layers.items()} \
        if method != "magnitude" else {}
    try:
        notes = _prune_unstructured(model, method, spec, layers, targets, calib, blocksize, dampening, progress)
    except BaseException:
        with torch.no_grad():
            for name, weight in kept.items():
                layers[name].weight.copy_(weight)
        raise
    del kept
    report = PruneReport(method=method, pattern=str(spec), allocation=allocation)
    for name, layer in layers.items():
        report.append(LayerPruneReport(name, tuple(layer.weight.shape), sparsity_of(layer.weight.detach()), str(spec),
                                       method, None if spec.kind == "n:m" else targets[name], notes.get(name, "")))
    return report


def _usable_inputs(name: str, count: int, sum_sq: torch.Tensor) -> None:
    """A ValueError unless the calibration inputs a layer saw can rank its weights: some tokens, all
    finite, not all zero (Wanda would rank by column position, SparseGPT would zero the layer)."""
    if not count:
        raise ValueError(f"calibration gave layer {name!r} no tokens")
    if not bool(torch.isfinite(sum_sq.float()).all()):  # (scores are float32)
        raise ValueError(f"calibration inputs of layer {name!r} hold inf or NaN (or overflow when squared): "
                         "nothing was pruned")
    if not bool(sum_sq.any()):
        raise ValueError(f"calibration inputs of layer {name!r} are all zero: nothing to rank its weights by; "
                         "nothing was pruned")


def _prune_unstructured(model, method, spec, layers, targets, calib, blocksize, dampening, progress) -> dict[str, str]:
    """Prunes `layers` in place by `method`; returns notes per layer name."""
    notes: dict[str, str] = {}
    if method == "magnitude":
        with torch.no_grad():
            for name, layer in layers.items():
                magnitude_prune_(layer.weight.data, spec, targets[name])
    elif method == "wanda":
        def stats(names):
            return {n: SquaredNorms(layers[n].in_features, module_device(layers[n])) for n in names}

        def apply(names, acc):
            for n in names:
                _usable_inputs(n, acc[n].count, acc[n].sum_sq)
            for n in names:
                wanda_prune_(layers[n].weight.data, acc[n].sum_sq, spec, targets[n])

        never = SequentialPruner(model, calib, layers, progress, "wanda").run(stats, apply, per_block=True)
        notes.update(dict.fromkeys(never, "not called during calibration: left dense"))
    else:
        def stats(names):
            return {names[0]: Hessian(layers[names[0]].in_features, module_device(layers[names[0]]))}

        def apply(names, acc):
            hess = acc.pop(names[0])
            _usable_inputs(names[0], hess.count, hess.sum_sq)
            dead = hess.H.diagonal() == 0
            U = inverse_cholesky_upper(hess.H, dampening)
            del hess
            for n in names:
                sparsegpt_prune_(layers[n].weight.data, None, spec, targets[n], blocksize, dampening, inverse_upper=U,
                                 dead_inputs=dead)

        never = SequentialPruner(model, calib, layers, progress, "sparsegpt").run(stats, apply, per_block=False)
        notes.update(dict.fromkeys(never, "not called during calibration: left dense"))
    return notes


def _allocate(model, layers, spec, sparsity, allocation, calib, max_layer_sparsity, owl_m, owl_lambda):
    if spec.kind == "n:m":
        if allocation != "uniform":
            warnings.warn(f"allocation={allocation!r} is ignored for pattern {spec}: n:m fixes every layer's "
                          f"sparsity at {spec.fixed_sparsity:.3f}", stacklevel=3)
        return alloc.uniform(layers, spec.fixed_sparsity)
    if allocation == "uniform":
        return alloc.uniform(layers, sparsity)
    if allocation == "global":
        return alloc.global_magnitude(layers, sparsity, max_layer_sparsity)
    if allocation == "lamp":
        return alloc.lamp(layers, sparsity, max_layer_sparsity)
    norms = collect_stats(model, calib, layers, lambda n, m: SquaredNorms(m.in_features, module_device(m)))
    uncalled = [n for n, s in norms.items() if s.count == 0]
    if uncalled:
        raise ValueError(f"allocation='owl': layers never called during calibration: {uncalled[:5]}")
    blocks = find_blocks(model, layers)
    groups = None
    if blocks is not None:
        prefix = f"{blocks[0]}." if blocks[0] else ""
        groups = {}
        for n in layers:
            rest = n[len(prefix):] if n.startswith(prefix) else ""
            head = rest.split(".", 1)[0]
            groups[n] = f"{prefix}{head}" if head.isdigit() else n
    return alloc.owl(layers, sparsity, {n: s.sum_sq for n, s in norms.items()}, groups, owl_m, owl_lambda,
                     max_layer_sparsity)


def _prune_structured(model, method, sparsity, spec, calibration, include, exclude, dampening, progress):
    selected = select_linears(model, include, exclude)
    modules = dict(model.named_modules())
    if spec.kind == "neurons":
        units = [u for u in find_mlps(model) if u.down in selected and all(x in selected for x in u.ups)]
        key = {u.down: u for u in units}
        kind = "MLP (up/gate -> down Linear pair, BERT intermediate/output, or Linear -> activation -> Linear)"
    else:
        units = [u for u in find_attention(model) if all(x in selected for x in (u.q, u.k, u.v, u.o))]
        key = {u.o: u for u in units}
        kind = "attention module (BERT query/key/value + output.dense, or q/k/v/o projections)"
    if not units:
        raise ValueError(f"pattern={str(spec)!r}: no {kind} found among the selected layers")
    results: dict[str, tuple[int, int, str]] = {}
    step = prune_mlp if spec.kind == "neurons" else prune_heads
    if method == "magnitude":
        for name, unit in key.items():
            results[name] = step(unit, modules, method, sparsity, None, dampening)
        never = []
    else:
        calib = Calibration(model, calibration)
        targets = {name: modules[name] for name in key}

        def stats(names):
            return {n: StructuredStats(targets[n].in_features, module_device(targets[n]), method == "sparsegpt")
                    for n in names}

        def apply(names, acc):
            for n in names:
                results[n] = step(key[n], dict(model.named_modules()), method, sparsity, acc[n], dampening)

        never = SequentialPruner(model, calib, targets, progress, f"{method} {spec.kind}").run(stats, apply)
    from .shrink import record_structure

    record_structure(model)
    report = PruneReport(method=method, pattern=str(spec), allocation="uniform")
    modules = dict(model.named_modules())
    notes: dict[str, list[str]] = {}
    for name, unit in key.items():
        removed, total, note = results.get(name, (0, 0, ""))
        if name in never:
            text_out = text_in = "not called during calibration: left dense"
        elif spec.kind == "neurons":
            text_out = f"{removed}/{total} output neurons removed"
            text_in = f"{removed}/{total} input neurons removed" + (f" ({note})" if note else "")
        else:
            text_out = f"{removed}/{total} heads removed"
            text_in = text_out + (f" ({note})" if note else "")
        outs = unit.ups if spec.kind == "neurons" else [unit.q, unit.k, unit.v]
        ins = [unit.down] if spec.kind == "neurons" else [unit.o]
        for m in outs:
            notes.setdefault(m, []).append(text_out)
        for m in ins:
            notes.setdefault(m, []).append(text_in)
    for m, texts in notes.items():
        w = modules[m].weight.detach()
        report.append(LayerPruneReport(m, tuple(w.shape), sparsity_of(w), str(spec), method, sparsity,
                                       "; ".join(texts)))
    return report
