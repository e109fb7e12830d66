"""Whole sparse models in and out: sf.save / sf.load (any model; models of torch.nn building
blocks rebuild themselves), sf.save_pretrained / sf.from_pretrained (transformers models, rebuilt
from config.json with their sparse layers and no dense copy of those layers), and exports to
dense-with-zeros and to the legacy compressed-tensors formats. Tensors go to safetensors, the
description to JSON; nothing is pickled."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._version import __version__
from .io._atomic import atomic_write_bytes, replacing_files
from .io._safetensors import read_safetensors, write_safetensors
from .io.compressed_tensors import PARAMS, write_compressed_tensors
from .io.inputs import check_module, effective_tensor
from .nn import ActSparseLinear, SparseLinear
from .prune.shrink import STRUCTURE_KEY, apply_structure

WEIGHTS = "model.safetensors"
DESCRIPTION = "sparseflow.json"
BUFFER_PREFIX = "__buffers__."  # non-persistent buffers (rotary tables, position ids) are saved too

DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


# ---- architecture of torch.nn building blocks: class name -> (args of a module, constructor) ----
def _no_args(cls):
    return (lambda m: {}, lambda a: cls())


BUILDING_BLOCKS = {
    "Linear": (lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                          "dtype": str(m.weight.dtype)},
               lambda a: nn.Linear(a["in_features"], a["out_features"], a["bias"], dtype=DTYPES[a["dtype"]])),
    "Embedding": (lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                             "padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
                             "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse,
                             "dtype": str(m.weight.dtype)},
                  lambda a: nn.Embedding(a["num_embeddings"], a["embedding_dim"], a["padding_idx"],
                                         a.get("max_norm"), a.get("norm_type", 2.0),
                                         a.get("scale_grad_by_freq", False), a.get("sparse", False),
                                         dtype=DTYPES[a["dtype"]])),
    "LayerNorm": (lambda m: {"shape": list(m.normalized_shape), "eps": m.eps, "affine": m.elementwise_affine,
                             "bias": getattr(m, "bias", None) is not None},
                  lambda a: nn.LayerNorm(a["shape"], a["eps"], a["affine"], bias=a["bias"])),
    "Dropout": (lambda m: {"p": m.p}, lambda a: nn.Dropout(a["p"])),
    "GELU": (lambda m: {"approximate": m.approximate}, lambda a: nn.GELU(a["approximate"])),
    "Flatten": (lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
                lambda a: nn.Flatten(a.get("start_dim", 1), a.get("end_dim", -1))),  # ({} before 0.1.0's end)
    **{name: _no_args(getattr(nn, name)) for name in ("ReLU", "SiLU", "Tanh", "Sigmoid", "Identity")},
}
CONTAINERS = {"Sequential": lambda children: nn.Sequential(*children), "ModuleList": nn.ModuleList}


def architecture(module: nn.Module) -> dict | None:
    """A JSON description that rebuilds the module, or None when it is not made of known blocks."""
    cls = type(module)
    if parametrize.is_parametrized(module):  # saved folded (_folded_state_dict): rebuilt as the plain class
        cls = cls.__bases__[0]
    name = cls.__name__
    if isinstance(module, (SparseLinear, ActSparseLinear)):
        return {"class": name, "spec": module.spec()}
    if type(module) in (nn.Sequential, nn.ModuleList):
        children = [architecture(c) for c in module]
        if any(c is None for c in children):
            return None
        names = list(module._modules)
        # children named otherwise than 0..n-1 (Sequential(OrderedDict(...))): their names are the keys
        return {"class": name, "children": children,
                **({"names": names} if names != [str(i) for i in range(len(names))] else {})}
    if name in BUILDING_BLOCKS and cls is getattr(nn, name):
        return {"class": name, "args": BUILDING_BLOCKS[name][0](module)}
    return None


def build(arch: dict) -> nn.Module:
    if not isinstance(arch, dict) or "class" not in arch:
        raise ValueError(f"{DESCRIPTION}: bad architecture entry {str(arch)[:200]}")
    name = arch["class"]
    try:
        if name in CONTAINERS:
            children = [build(c) for c in arch.get("children", [])]
            names = arch.get("names")
            if names is None:
                return CONTAINERS[name](children)
            if name != "Sequential" or not isinstance(names, list) or len(names) != len(children) or \
                    not all(isinstance(n, str) for n in names):
                raise ValueError("bad child names")
            return nn.Sequential(OrderedDict(zip(names, children, strict=True)))
        if name in ("SparseLinear", "ActSparseLinear"):
            with torch.device("cpu"):  # placeholders that load_state_dict replaces on the CPU (not on meta)
                return skeleton(arch["spec"])
        if name in BUILDING_BLOCKS:
            return BUILDING_BLOCKS[name][1](arch["args"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, AssertionError, OverflowError) as e:
        # (torch: negative or huge sizes, an Embedding's padding_idx out of range)
        raise ValueError(f"{DESCRIPTION}: bad {name!r} entry in the architecture ({type(e).__name__}: {e})") from None
    raise ValueError(f"{DESCRIPTION}: cannot rebuild a {name!r}; pass model= a skeleton to sf.load")


# ---- sparse module skeletons, filled by load_state_dict (which validates every index) ----
def _flag(spec: dict, key: str, default: bool | None = None) -> bool:
    """A JSON true/false of the spec (bool("false") is True: a string would load as its opposite)."""
    value = spec.get(key, default) if default is not None else spec[key]
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r}")
    return value


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{what} must be an int >= 0, got {value!r}")
    return value


def skeleton(spec: dict) -> nn.Module:
    """The sparse module a spec describes, with placeholder buffers (load_state_dict fills them). Each
    field must have its JSON type: a tampered description is refused, never read loosely."""
    try:
        kind, shape = spec["type"], spec["shape"]
        if not isinstance(shape, list) or len(shape) != 2:
            raise TypeError(f"shape must be [out_features, in_features], got {shape!r}")
        shape = tuple(_count(s, "shape") for s in shape)
        if kind == "SparseLinear":
            return SparseLinear.empty(spec["format"], spec.get("params") or {}, shape, _flag(spec, "bias"),
                                      spec.get("dense_above"), _flag(spec, "keep_dense", False))
        if kind == "ActSparseLinear":
            threshold = spec["threshold"]
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise TypeError(f"threshold must be a number, got {threshold!r}")
            return ActSparseLinear.empty(shape, float(threshold), spec["weight_format"], _flag(spec, "bias"),
                                         _flag(spec, "shift"), spec.get("dense_above"),
                                         _flag(spec, "keep_dense", False), _flag(spec, "folded_bias", False))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{DESCRIPTION}: bad module spec {spec!r} ({e})") from None
    raise ValueError(f"{DESCRIPTION}: unknown module type {kind!r}")


def _sparse_modules(model: nn.Module) -> dict[str, dict]:
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, (SparseLinear, ActSparseLinear))}


def _nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mname, module in model.named_modules():
        for bname in getattr(module, "_non_persistent_buffers_set", ()):
            if bname in getattr(module, "derived_buffers", ()):
                continue
            t = module._buffers.get(bname)
            if t is not None:
                out[f"{BUFFER_PREFIX}{mname + '.' if mname else ''}{bname}"] = t
    return out


def _write(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**_folded_state_dict(model), **_nonpersistent_buffers(model)}
    description = {"sparseflow": __version__, "modules": _sparse_modules(model), **extra}
    write_safetensors(directory / WEIGHTS, tensors, {"sparseflow": json.dumps(description)})
    atomic_write_bytes(directory / DESCRIPTION, json.dumps(description, indent=1).encode())


def _folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with torch's own pruning folded in: a layer pruned with torch.nn.utils.prune
    (X.weight_orig, X.weight_mask) or parametrized (X.parametrizations.weight.*; torch.ao's
    FakeSparsity keeps its mask out of the state dict) is saved as its effective X.weight, which
    the rebuilt plain layer loads (sparsify leaves such layers dense where sparse does not pay)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for p in ("weight", "bias"):
            pruned = hasattr(module, f"{p}_orig") and hasattr(module, f"{p}_mask")
            if not (pruned or parametrize.is_parametrized(module, p)):
                continue
            folded = (f"{prefix}{p}_orig", f"{prefix}{p}_mask")
            for key in [k for k in state if k in folded or k.startswith(f"{prefix}parametrizations.{p}.")]:
                del state[key]
            state[f"{prefix}{p}"] = effective_tensor(module, p)
    return state


def _read(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS}: not a model saved by sparseflow")
    metadata, tensors = read_safetensors(directory / WEIGHTS)
    try:
        description = json.loads(metadata["sparseflow"])
        assert isinstance(description, dict) and isinstance(description["modules"], dict)
    except (KeyError, ValueError, AssertionError, TypeError, RecursionError):
        raise ValueError(f"{directory / WEIGHTS}: missing or damaged sparseflow description") from None
    return description, tensors


def _fill(model: nn.Module, description: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    for name, spec in description["modules"].items():
        if not isinstance(spec, dict):
            raise ValueError(f"{DESCRIPTION}: bad spec for {name!r}")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{DESCRIPTION}: the model has no module {name!r}") from None
        layer = skeleton(spec)
        if isinstance(current, nn.Linear) and (layer.out_features, layer.in_features) != (current.out_features,
                                                                                       current.in_features):
            # (the model's own layer says what fits there; a declared shape is also what a dense copy allocates)
            raise ValueError(f"{DESCRIPTION}: {name} is declared {layer.out_features}x{layer.in_features}, the model's "
                             f"layer there is {current.out_features}x{current.in_features}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    buffers = {k[len(BUFFER_PREFIX):]: v for k, v in tensors.items() if k.startswith(BUFFER_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(BUFFER_PREFIX)}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"{WEIGHTS} does not fit the model: {e}") from None
    for name, t in buffers.items():
        mname, _, bname = name.rpartition(".")
        try:
            module = model.get_submodule(mname) if mname else model
        except AttributeError:
            raise ValueError(f"{WEIGHTS}: {BUFFER_PREFIX}{name} names no module of the model") from None
        current = module._buffers.get(bname)
        # only a saved non-persistent buffer (rotary tables, position ids) comes back this way: a
        # weight's buffers were validated by load_state_dict and must not be replaced unchecked
        if (bname not in getattr(module, "_non_persistent_buffers_set", ()) or current is None
                or bname in getattr(module, "derived_buffers", ())):
            raise ValueError(f"{WEIGHTS}: {BUFFER_PREFIX}{name} is not a non-persistent buffer of the model")
        # (a model converted with .to(bf16) converts its rotary tables too, one built from a config
        # has them in float32: floats are taken as saved, as assign=True takes the parameters)
        same_kind = t.dtype == current.dtype or (t.is_floating_point() and current.is_floating_point())
        if t.shape != current.shape or not same_kind:
            raise ValueError(f"{WEIGHTS}: {BUFFER_PREFIX}{name} has shape {tuple(t.shape)} and {t.dtype}, the "
                             f"model's has {tuple(current.shape)} and {current.dtype}")
        module._buffers[bname] = t
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:  # a model built on the meta device that the file does not fill
        raise ValueError(f"{WEIGHTS} does not fill the model: nothing for {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    return model


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Saves any model with its sparse layers: model.safetensors + sparseflow.json."""
    check_module(model, "sf.save")
    _write(model, directory, {"architecture": architecture(model)})


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Loads what sf.save wrote. Models of torch.nn building blocks rebuild by themselves; for
    others pass `model`, a skeleton of the original (its dense weights are replaced)."""
    if model is not None:
        check_module(model, "sf.load")
    description, tensors = _read(directory)
    if model is None:
        arch = description.get("architecture")
        if arch is None:
            raise ValueError(f"{directory}: this model is not made of torch.nn building blocks only; "
                             "pass model= an instance of its class")
        with torch.device("meta"):  # nothing is allocated but what the file holds (assign=True below)
            model = build(arch)
        description = {**description, "modules": {}}  # the architecture already holds the sparse modules
    return _fill(model, description, tensors).eval()


def _save_config(model: nn.Module, directory: Path) -> None:
    """config.json naming the model's class, as transformers' own save_pretrained writes it (AutoModel
    and sparseflow.prune.load_shrunk read `architectures`), and generation_config.json where the
    model has one (its stop tokens and sampling settings)."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        # as it is: transformers' save_pretrained refuses settings it finds inconsistent (a temperature
        # without sampling), which the model carries and generates with all the same
        generation.to_json_file(directory / "generation_config.json")


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Saves a transformers model with its sparse layers: config.json + model.safetensors + sparseflow.json."""
    config = getattr(check_module(model, "sf.save_pretrained"), "config", None)
    if config is None:
        raise TypeError("save_pretrained needs a transformers model (with .config); use sf.save otherwise")
    with replacing_files(directory, ("config.json", "generation_config.json", DESCRIPTION, WEIGHTS)) as tmp:
        _save_config(model, tmp)
        _write(model, tmp, {"transformers_class": type(model).__name__})


def from_pretrained(directory: str | os.PathLike) -> nn.Module:
    """Rebuilds a transformers model saved by save_pretrained. The model is created on the meta
    device, its sparse layers are swapped in, and only saved tensors are materialised."""
    import transformers

    description, tensors = _read(directory)
    cls_name = description.get("transformers_class")
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{directory}: {cls_name!r} is no transformers model class")
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: sf.from_pretrained rebuilds the model from it "
                                "(sf.load reads a model saved by sf.save)")
    config = transformers.AutoConfig.from_pretrained(directory)
    structure = getattr(config, STRUCTURE_KEY, None)
    with torch.device("meta"):
        try:
            model = cls(config)
        except (AttributeError, TypeError, ValueError) as e:  # a class that does not fit the config
            raise ValueError(f"{directory}: {cls_name} does not fit its config.json ({type(e).__name__}: {e})") \
                from None
        if structure:  # shrunk by structured pruning: heads or neurons removed, biases added
            try:
                apply_structure(model, structure)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:  # (torch:
                raise ValueError(f"{directory}/config.json: bad {STRUCTURE_KEY} ({type(e).__name__}: {e})") \
                    from None  # negative or huge sizes)
    model = _fill(model, description, tensors)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights") and \
            not isinstance(output, (SparseLinear, ActSparseLinear)):  # (a sparse lm_head holds its own weight)
        model.tie_weights()
    if (Path(directory) / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model.eval()


# ---- exports ----
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent dense model (zeros where pruned): what other engines load."""
    out = {}
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, (SparseLinear, ActSparseLinear))}
    for key, t in _folded_state_dict(model).items():  # (torch's own pruning folded into the weights)
        if not any(key.startswith(name + ".") for name in sparse):
            out[key] = t
    for name, m in sparse.items():
        if isinstance(m, SparseLinear):
            w = m.weight if m.format_name == "dense" else m.weight.to_dense()
            bias = m.bias
        else:
            wt = m.w_t()
            w = (wt if isinstance(wt, torch.Tensor) else wt.to_dense()).t().contiguous()
            bias = m.dense_bias(w)  # (the folded shift taken out again; none where the layer had none)
        out[f"{name}.weight"] = w
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
    return out


def densified(model: nn.Module) -> nn.Module:
    """A copy with every sparse layer (weight- or activation-sparse) replaced by the equivalent
    dense nn.Linear (zeros where pruned)."""
    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, (SparseLinear, ActSparseLinear)):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, mod.to_linear())
    return dense


def saved_by_sparseflow(directory: str | os.PathLike) -> bool:
    """Whether a directory holds a model sf.save or sf.save_pretrained wrote."""
    return (Path(directory) / DESCRIPTION).is_file()


def _warn_structure_lost(model: nn.Module, what: str) -> None:
    """Structured pruning may add biases the architecture has none of (its refit of the next layer):
    other engines build the model from its config and drop them, so their outputs differ."""
    structure = getattr(getattr(model, "config", None), STRUCTURE_KEY, None) or {}
    added = structure.get("bias", [])
    if added:
        warnings.warn(f"{what}: {len(added)} layers ({', '.join(added[:3])}{', ...' if len(added) > 3 else ''}) "
                      f"carry biases that {type(model).__name__} has no place for (added by structured pruning); "
                      "transformers and vLLM drop them and compute something else. sparseflow.prune.load_shrunk "
                      "(or sf.save_pretrained + sf.from_pretrained) keeps them.", UserWarning, stacklevel=3)


def export_dense(model: nn.Module, directory: str | os.PathLike) -> None:
    """Dense-with-zeros safetensors (+ config.json for transformers models) that transformers and
    vLLM load unchanged."""
    check_module(model, "sf.export_dense")
    _warn_structure_lost(model, "export_dense")
    with replacing_files(directory, ("config.json", "generation_config.json", WEIGHTS)) as tmp:
        if getattr(model, "config", None) is not None:
            _save_config(model, tmp)
        write_safetensors(tmp / WEIGHTS, dense_state_dict(model), {"format": "pt"})


def export_compressed_tensors(model: nn.Module, directory: str | os.PathLike,
                              format: str = "sparse-bitmask") -> None:
    """The legacy compressed-tensors layout (sparse-bitmask or sparse-24-bitmask)."""
    from .io.inputs import compress

    check_module(model, "sf.export_compressed_tensors")
    if format not in PARAMS:  # (before compressing: any other name was taken for 2:4)
        raise ValueError(f"format must be one of {list(PARAMS)}, got {format!r}")
    _warn_structure_lost(model, "export_compressed_tensors")
    sparse_names = {name for name, m in model.named_modules() if isinstance(m, (SparseLinear, ActSparseLinear))}
    weights: dict[str, Any] = {}
    for key, t in dense_state_dict(model).items():
        is_sparse_weight = key.endswith(".weight") and key[: -len(".weight")] in sparse_names
        weights[key] = compress(t, "bitmask" if format == "sparse-bitmask" else "2:4") if is_sparse_weight else t
    config = None
    if getattr(model, "config", None) is not None:
        config = {**model.config.to_dict(), "architectures": [type(model).__name__]}  # (vLLM picks the class by it)
    write_compressed_tensors(weights, directory, format, config)
