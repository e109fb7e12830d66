"""What the sparse modules' own load_state_dict shares: they hold no submodules, so every key under
their prefix is theirs."""

from __future__ import annotations

import torch
from torch import nn


def unexpected_of(state_dict: dict, prefix: str, known: list[str]) -> list[str]:
    """The keys under `prefix` that name nothing the module holds (strict loading reports them)."""
    return [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in known]


def as_kept(incoming: torch.Tensor, current: torch.Tensor | None, loaded: bool) -> torch.Tensor:
    """A loaded tensor as the module keeps it: sizes from the checkpoint, but the module's device and
    floating dtype, as nn.Linear's load_state_dict copies into its parameters (a module that holds
    only placeholders takes the checkpoint's dtype). Contiguous, and a copy: the kernels read it."""
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
