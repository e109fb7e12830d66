"""What the sparse modules' own load_state_dict shares: they hold no submodules, so every key under
their prefix is theirs."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# The dense layer's (out_features, in_features), int64, in a sparse module's state dict: a CSR or
# BSR layer's buffers do not say its in_features (nor a bitmask's within a byte of mask), so
# without it a state dict of a narrower layer loaded as a valid weight of the wider one.
SHAPE_KEY = "weight_shape"


def unexpected_of(state_dict: dict, prefix: str, known: list[str]) -> list[str]:
    """The keys under `prefix` that name nothing the module holds (strict loading reports them)."""
    known = [*known, SHAPE_KEY]
    return [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in known]


def save_shape(module: nn.Module, destination: dict, prefix: str) -> None:
    destination[prefix + SHAPE_KEY] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)


def check_shape(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """A ValueError where the state dict records another layer shape than the module's (a state
    dict saved before the record existed has none: its buffers are checked as before)."""
    t = state_dict.get(prefix + SHAPE_KEY)
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (2,):
        raise ValueError(f"{prefix}{SHAPE_KEY} must be an int64 tensor of 2 elements (out_features, in_features), "
                         f"got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} of shape "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else '?'}")
    shape = tuple(int(v) for v in t.tolist())
    if shape != (module.out_features, module.in_features):
        where = f" for {prefix.rstrip('.')}" if prefix else ""
        raise ValueError(f"the state dict holds a {shape[0]}x{shape[1]} layer{where} (out x in features), this "
                         f"module is {module.out_features}x{module.in_features}")


def as_kept(incoming: torch.Tensor, current: torch.Tensor | None, loaded: bool, key: str = "") -> torch.Tensor:
    """A loaded tensor as the module keeps it: sizes from the checkpoint, but the module's device and
    floating dtype, as nn.Linear's load_state_dict copies into its parameters (a module that holds
    only placeholders takes the checkpoint's dtype). Contiguous, and a copy: the kernels read it."""
    if not isinstance(incoming, torch.Tensor):
        raise TypeError(f"{key or 'a state dict entry'} must be a tensor, got {type(incoming).__name__}")
    t = incoming.detach()
    if loaded and isinstance(current, torch.Tensor):
        floating = t.is_floating_point() and current.is_floating_point()
        t = t.to(device=current.device, dtype=current.dtype if floating else t.dtype)
    return t.clone(memory_format=torch.contiguous_format)


def check_float(prefix: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A loaded float tensor beside a weight (its bias, shift, dense weight) must have the shape and
    the dtype the kernels take it with: refused at load, not at the first forward."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{prefix}{name} must be {dtype} of shape {tuple(shape)} (as the weight), "
                         f"got {t.dtype} of shape {tuple(t.shape)}")


def load_bias(module: nn.Module, bias: torch.Tensor) -> None:
    """The loaded bias into the module's bias Parameter, as nn.Linear's load_state_dict does: copied
    in place where it fits (the same object, so an optimizer's hold on it and its requires_grad
    stay), else a new Parameter that keeps the old one's requires_grad (a placeholder's, or an
    inference tensor outside inference mode, which cannot be written)."""
    old = module.bias
    fits = (old is not None and old.shape == bias.shape and old.dtype == bias.dtype and old.device == bias.device
            and (not old.is_inference() or torch.is_inference_mode_enabled()))
    if fits:
        with torch.no_grad():
            old.copy_(bias)
    else:
        module.bias = nn.Parameter(bias, requires_grad=old is not None and old.requires_grad)


def missing_placeholders(module: nn.Module, prefix: str, names: list[str], incoming: dict) -> None:
    """A module of placeholders (.empty) takes a whole weight: a ValueError naming the buffers a state
    dict that brings some of them lacks (else the placeholders were validated as the weight's)."""
    if module._unloaded and incoming:
        missing = [prefix + n for n in names if n not in incoming]
        if missing:
            raise ValueError(f"the state dict lacks {', '.join(missing)} (a layer built with .empty() takes a "
                             "whole weight)")


@contextlib.contextmanager
def named_layer(prefix: str):
    """A weight's validation error with the layer it belongs to (inside a model)."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if not prefix:
            raise
        raise type(e)(f"{prefix.rstrip('.')}: {e}") from None
