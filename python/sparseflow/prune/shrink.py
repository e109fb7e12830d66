"""Physically remove pruned neurons and heads, so that dense kernels do less work.

`shrink(model)` finds every MLP and attention module (structured.find_mlps / find_attention) and
removes each neuron whose down-projection column is all zero, and each head (k/v group) whose
o-projection columns are all zero: such a unit contributes exactly nothing to the output whatever
its up rows hold, so the shrunk model computes what the pruned one did. The Linears are replaced
by smaller ones and the attention module's head count is updated.

Saving and reloading a shrunk transformers model: shrink records the new sizes in
`model.config.sparseflow_structure`, and where the config can express them (every MLP the same
width: `intermediate_size`; every attention module with the same head count in a config with
`head_dim`, such as Llama's) it updates the config too, so `from_pretrained` alone rebuilds the
model. `load_shrunk(path)` rebuilds any shrunk model (BERT heads, uneven widths, added biases)."""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .report import ShrinkEntry, ShrinkReport
from .structured import AttentionUnit, MLPUnit, find_attention, find_mlps

STRUCTURE_KEY = "sparseflow_structure"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _resized(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
             shape: tuple[int, int] | None = None) -> nn.Linear:
    """A new Linear holding linear's weight restricted to `rows` x `cols` (or, with `shape`, an
    uninitialised one of that shape [out, in], for loading)."""
    w = linear.weight
    out_f, in_f = shape if shape is not None else (
        w.shape[0] if rows is None else rows.numel(), w.shape[1] if cols is None else cols.numel())
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    if shape is None:
        sub = w if rows is None else w[rows.to(w.device)]
        sub = sub if cols is None else sub[:, cols.to(w.device)]
        new.weight.copy_(sub)
        if linear.bias is not None:
            new.bias.copy_(linear.bias if rows is None else linear.bias[rows.to(w.device)])
    new.weight.requires_grad_(w.requires_grad)
    if getattr(linear, "_sparseflow_bias_added", False):
        new._sparseflow_bias_added = True
    return new


def _shrink_mlp(model: nn.Module, unit: MLPUnit, keep: torch.Tensor) -> int:
    before = sum(p.numel() for n in [*unit.ups, unit.down] for p in model.get_submodule(n).parameters())
    for u in unit.ups:
        _set_module(model, u, _resized(model.get_submodule(u), rows=keep))
    _set_module(model, unit.down, _resized(model.get_submodule(unit.down), cols=keep))
    after = sum(p.numel() for n in [*unit.ups, unit.down] for p in model.get_submodule(n).parameters())
    return before - after


_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def _shrink_attention(model: nn.Module, unit: AttentionUnit, kept_units: list[int]) -> int:
    names = [unit.q, unit.k, unit.v, unit.o]
    before = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    q_rows = torch.cat([torch.arange(unit.q_rows(u).start, unit.q_rows(u).stop) for u in kept_units])
    kv = torch.cat([torch.arange(unit.kv_rows(u).start, unit.kv_rows(u).stop) for u in kept_units])
    _set_module(model, unit.q, _resized(model.get_submodule(unit.q), rows=q_rows))
    _set_module(model, unit.k, _resized(model.get_submodule(unit.k), rows=kv))
    _set_module(model, unit.v, _resized(model.get_submodule(unit.v), rows=kv))
    _set_module(model, unit.o, _resized(model.get_submodule(unit.o), cols=q_rows))
    _set_head_attrs(model.get_submodule(unit.name), len(kept_units) * unit.group, len(kept_units), unit.head_dim)
    after = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    return before - after


def _set_head_attrs(holder: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(holder, attr, None), int):
            setattr(holder, attr, heads)
    for attr in _KV_ATTRS:
        if isinstance(getattr(holder, attr, None), int):
            setattr(holder, attr, kv_heads)
    if isinstance(getattr(holder, "all_head_size", None), int):  # BERT
        holder.all_head_size = heads * head_dim


def _dead_columns(linear: nn.Linear) -> torch.Tensor:
    return (linear.weight.detach() == 0).all(dim=0).cpu()


def structure_of(model: nn.Module) -> dict:
    """The sizes a fresh model from the config must be given to hold this model's weights."""
    mlp = {u.down: u.size(dict(model.named_modules())) for u in find_mlps(model)}
    heads = {u.name: [u.num_heads, u.num_kv_heads] for u in find_attention(model)}
    bias = [n for n, m in model.named_modules() if getattr(m, "_sparseflow_bias_added", False)]
    return {"mlp": mlp, "heads": heads, "bias": bias}


def _own_config(model: nn.Module, config):
    """A copy of the config for this model and every submodule that shares it: transformers keeps the
    caller's config object, which other models built from it share, and their configs must keep
    describing their own sizes."""
    own = copy.deepcopy(config)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = own
    return own


def record_structure(model: nn.Module) -> None:
    """Write structure_of(model) into model.config (a transformers config), where save_pretrained
    stores it, and update the config's own size fields where they can describe the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    config = _own_config(model, config)
    structure = structure_of(model)
    setattr(config, STRUCTURE_KEY, structure)
    widths = set(structure["mlp"].values())
    if len(widths) == 1 and isinstance(getattr(config, "intermediate_size", None), int):
        config.intermediate_size = widths.pop()
    counts = {tuple(v) for v in structure["heads"].values()}
    if len(counts) == 1 and isinstance(getattr(config, "head_dim", None), int) and \
            isinstance(getattr(config, "num_key_value_heads", None), int):
        heads, kv = counts.pop()
        config.num_attention_heads, config.num_key_value_heads = heads, kv


@torch.no_grad()
def shrink(model: nn.Module, neurons: bool = True, heads: bool = True) -> ShrinkReport:
    """Remove every MLP neuron whose down-projection column is zero and every attention head (k/v
    group) whose o-projection columns are zero; returns a ShrinkReport. At least one neuron / head
    is kept per module. In place; the model computes the same function as before."""
    report = ShrinkReport()
    if neurons:
        for unit in find_mlps(model):
            down = model.get_submodule(unit.down)
            dead = _dead_columns(down)
            total = dead.numel()
            if not bool(dead.any()):
                continue
            if bool(dead.all()):
                dead[0] = False  # a zero-width Linear is legal in torch but not in every exporter
            keep = (~dead).nonzero().flatten()
            removed = _shrink_mlp(model, unit, keep)
            report.append(ShrinkEntry(unit.name, "neurons", total, keep.numel(), [*unit.ups, unit.down], removed))
    if heads:
        for unit in find_attention(model):
            o = model.get_submodule(unit.o)
            dead_cols = _dead_columns(o)
            dead = [u for u in range(unit.units) if bool(dead_cols[unit.q_rows(u)].all())]
            if not dead:
                continue
            kept = [u for u in range(unit.units) if u not in dead] or [dead.pop(0)]
            removed = _shrink_attention(model, unit, kept)
            report.append(ShrinkEntry(unit.name, "heads", unit.num_heads, len(kept) * unit.group,
                                      [unit.q, unit.k, unit.v, unit.o], removed))
    record_structure(model)
    return report


@torch.no_grad()
def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built model to a recorded structure (weights uninitialised where resized)."""
    mlps = {u.down: u for u in find_mlps(model)}
    for down, size in structure.get("mlp", {}).items():
        unit = mlps.get(down)
        if unit is None:
            raise ValueError(f"recorded MLP {down!r} not found in the model")
        if unit.size(dict(model.named_modules())) == size:
            continue
        for u in unit.ups:
            lin = model.get_submodule(u)
            _set_module(model, u, _resized(lin, shape=(size, lin.in_features)))
        lin = model.get_submodule(down)
        _set_module(model, down, _resized(lin, shape=(lin.out_features, size)))
    attention = {u.name: u for u in find_attention(model)}
    for name, (heads, kv) in structure.get("heads", {}).items():
        unit = attention.get(name)
        if unit is None:
            raise ValueError(f"recorded attention module {name!r} not found in the model")
        if (unit.num_heads, unit.num_kv_heads) == (heads, kv):
            continue
        hd = unit.head_dim
        for n, rows in ((unit.q, heads * hd), (unit.k, kv * hd), (unit.v, kv * hd)):
            lin = model.get_submodule(n)
            _set_module(model, n, _resized(lin, shape=(rows, lin.in_features)))
        lin = model.get_submodule(unit.o)
        _set_module(model, unit.o, _resized(lin, shape=(lin.out_features, heads * hd)))
        _set_head_attrs(model.get_submodule(name), heads, kv, hd)
    for name in structure.get("bias", []):
        lin = model.get_submodule(name)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin._sparseflow_bias_added = True
    return model


def _checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def load_shrunk(path: str, model_class=None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a transformers model saved with save_pretrained after `shrink` (or after structured
    pruning that added biases): builds the model from its config, resizes it to the recorded
    structure, then loads the safetensors weights. Without a recorded structure this is
    `model_class.from_pretrained(path)`. `model_class` defaults to the config's architecture."""
    import transformers

    if os.path.exists(os.path.join(path, "sparseflow.json")):  # written by sf.save_pretrained (sparse layers)
        from ..model_io import from_pretrained

        return from_pretrained(path).to(device)
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        model_class = model_class or transformers.AutoModel
    structure = getattr(config, STRUCTURE_KEY, None)
    if not structure:
        return model_class.from_pretrained(path).to(device)
    if hasattr(model_class, "from_config") and model_class.__name__.startswith("Auto"):
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    apply_structure(model, structure)
    tensors = _checkpoint_tensors(path)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the model lacks: {unexpected[:5]}")
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors the model needs: {missing[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()
