"""What sparseflow accepts as a weight: dense tensors with zeros, nn.Linear modules, modules pruned
with torch.nn.utils.prune or torch.nn.utils.parametrize (torch.ao.pruning), and state dicts of
such modules; plus `compress`, which turns one into a format chosen by a short string.

Key names, as torch 2.13 writes them:
- torch.nn.utils.prune: "X.weight_orig" and "X.weight_mask" (the module's `weight` is a plain
  attribute recomputed by a forward pre-hook, so it can be stale; we recompute it).
- torch.nn.utils.parametrize: "X.parametrizations.weight.original", plus each parametrization's
  buffers as "X.parametrizations.weight.<i>.<buffer>". torch.ao.pruning's FakeSparsity overrides
  state_dict() to return {}, so its mask is NOT in the model's state dict: it lives in
  `sparsifier.state_dict()["state"][fqn]["mask"]` until `sparsifier.squash_mask()` folds it in.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats import BSR, CSR, NM, Bitmask, SparseFormat
from ..formats.base import check_weight, densified


def check_module(model: Any, caller: str) -> nn.Module:
    """The model a public entry point was given, or a TypeError that says what it got."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    return model


def _apply_mask(name: str, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
    # orig * mask is what torch computes; where(mask == 0, 0, ...) also zeroes a pruned inf or NaN,
    # which would otherwise give NaN (inf * 0) in a position that is meant to be pruned.
    masked = w * mask.to(w.dtype)
    return torch.where(mask != 0, masked, torch.zeros((), dtype=w.dtype, device=w.device))


def effective_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """A module's tensor `name` ("weight", "bias") as its forward uses it, or None: pruned with
    torch.nn.utils.prune (name_orig * name_mask, recomputed: the attribute itself is only refreshed
    by a forward and can be stale), parametrized (evaluated), or plain."""
    what = f"{type(module).__name__}.{name}"
    orig, mask = getattr(module, f"{name}_orig", None), getattr(module, f"{name}_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        return _apply_mask(what, orig.detach(), mask.detach())
    if parametrize.is_parametrized(module, name):
        chain = module.parametrizations[name]
        masks = [getattr(p, "mask", None) for p in chain]
        if all(isinstance(m, torch.Tensor) for m in masks):  # mask-only (torch.ao's FakeSparsity): as the
            t = chain.original.detach()  # prune path, so an inf or NaN pruned away gives 0, not NaN
            for m in masks:
                t = _apply_mask(what, t, m.detach())
            return t
    with torch.no_grad():
        t = getattr(module, name, None)  # evaluates any parametrization on the live module
    return t.detach() if isinstance(t, torch.Tensor) else None


def dense_weight(obj: Any) -> torch.Tensor:
    """The effective dense weight [out, in] (pruned entries are zeros) of a dense tensor, a sparseflow
    format, a torch sparse tensor, an nn.Linear, a module pruned with torch.nn.utils.prune, or a
    module with a torch.nn.utils.parametrize parametrization on `weight` (torch.ao.pruning style)."""
    if isinstance(obj, SparseFormat):
        return obj.to_dense()
    if isinstance(obj, nn.Module):
        w = effective_tensor(obj, "weight")
        if w is None:
            raise TypeError(f"{type(obj).__name__} has no weight tensor")
        return check_weight(w, f"{type(obj).__name__}.weight")
    if isinstance(obj, torch.Tensor):
        return check_weight(densified(obj.detach()))
    raise TypeError(f"expected a tensor, an nn.Module or a sparseflow format, got {type(obj).__name__}")


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


def state_dict_weights(
    sd: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A state dict with pruning folded in: "X.p_orig" * "X.p_mask" -> "X.p" (torch.nn.utils.prune)
    and "X.parametrizations.p.original" times any "X.parametrizations.p.<i>.mask" -> "X.p"
    (torch.nn.utils.parametrize). Other entries pass through. `masks` adds masks by folded name,
    e.g. torch.ao's `{fqn: s["mask"] for fqn, s in sparsifier.state_dict()["state"].items()}`.
    A parametrization whose buffers are not masks cannot be evaluated from a state dict: it raises
    ValueError (pass the live module to dense_weight instead)."""
    # First pass: which keys fold into which weight, so that key order in `sd` does not matter.
    folds: dict[str, tuple[str, list[str]]] = {}  # key of the unmasked weight -> (folded name, mask keys)
    for key in sd:
        if re.search(r"(?:^|\.)parametrizations\.[^.]+\.original\d+$", key):  # weight_norm and friends
            raise ValueError(f"{key!r} belongs to a parametrization of several tensors, so the weight cannot be "
                             "computed from the state dict; load it into the module and call dense_weight(module)")
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in sd:
            folds[key] = (key[: -len("_orig")], [key[: -len("_orig")] + "_mask"])
        elif (match := _PARAMETRIZED.match(key)) is not None:
            prefix, param = match.group(1), match.group(2)
            base = key[: -len("original")]
            mask_keys = []
            for other in sorted(k for k in sd if k.startswith(base) and k != key):
                if not re.fullmatch(r"\d+\.mask", other[len(base):]):
                    raise ValueError(
                        f"{other!r} is a parametrization entry that is not a mask, so the weight cannot be "
                        "computed from the state dict; load it into the module and call dense_weight(module)"
                    )
                mask_keys.append(other)
            folds[key] = (f"{prefix}.{param}" if prefix else param, mask_keys)
    consumed = {k for _, mask_keys in folds.values() for k in mask_keys}

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in consumed:
            continue
        if key not in folds:
            out[key] = value
            continue
        name, mask_keys = folds[key]
        if name in sd:
            raise ValueError(f"the state dict has both {name!r} and {key!r}; which is the weight?")
        w = value.detach()
        for mask_key in mask_keys:
            w = _apply_mask(name, w, sd[mask_key].detach())
        if not mask_keys and not (masks and name in masks):
            warnings.warn(
                f"{name}: the state dict has {key!r} but no mask; torch.ao.pruning's FakeSparsity does "
                "not save its mask, so the weight is taken unpruned. Call sparsifier.squash_mask() before "
                "state_dict(), or pass masks={...} from sparsifier.state_dict()['state']",
                stacklevel=2,
            )
        out[name] = w
    for name, mask in (masks or {}).items():
        if name not in out:
            raise ValueError(f"masks names {name!r}, which is not in the state dict")
        out[name] = _apply_mask(name, out[name], mask.detach())
    return out


def parse_format(spec: str) -> tuple[type[SparseFormat], dict[str, Any]]:
    """A format string -> (format class, from_dense keyword arguments). Accepts "bitmask", "csr",
    "bsr" (32x32 blocks), "block(bm,bk)", "nm" (2:4) and "n:m" such as "2:4" or "4:8"."""
    if not isinstance(spec, str):
        raise TypeError(f"format must be a string, got {type(spec).__name__}")
    s = spec.strip().lower().replace(" ", "")
    simple = {"bitmask": (Bitmask, {}), "csr": (CSR, {}), "bsr": (BSR, {}), "nm": (NM, {"n": 2, "m": 4})}
    if s in simple:
        cls, params = simple[s]
        return cls, dict(params)
    if match := re.fullmatch(r"(?:block|bsr)\((\d+),(\d+)\)", s):
        return BSR, {"block": (int(match.group(1)), int(match.group(2)))}
    if match := re.fullmatch(r"(\d+):(\d+)", s):
        return NM, {"n": int(match.group(1)), "m": int(match.group(2))}
    raise ValueError(
        f"unknown format {spec!r}; use 'bitmask', 'csr', 'bsr', 'block(bm,bk)', 'nm' (2:4) or an N:M ratio such as "
        "'2:4' or '4:8'"
    )


def finds_ratio(format: Any) -> bool:
    """Whether `format` is "n:m": the N:M ratio the weight already has, found by compress."""
    return isinstance(format, str) and format.strip().lower() == "n:m"


def compress(w: Any, format: str = "bitmask") -> SparseFormat:
    """Compresses anything dense_weight accepts into the format named by `format` (see parse_format;
    "n:m" takes the N:M pattern the weight already has). N:M raises ValueError if the weight is not
    n:m sparse (it never prunes)."""
    w = dense_weight(w)
    if finds_ratio(format):
        from ..formats import detect_pattern

        pattern = detect_pattern(w)
        if pattern.kind != "n:m":
            raise ValueError(f"format 'n:m' needs an n:m sparse weight; this one is {pattern}")
        return NM.from_dense(w, n=pattern.n, m=pattern.m)
    cls, params = parse_format(format)
    return cls.from_dense(w, **params)
