"""SparseLinear: an nn.Linear whose weight is stored compressed (Bitmask, CSR, BSR, N:M).

The format's buffers are registered as module buffers `weight_<name>` (so state_dict, .to() and
torch.compile see plain tensors) and forward calls the format's custom op. Above `dense_above`
rows of x, where the sparse kernel measured slower, forward runs the batched path instead: on the
CPU the weight is decompressed in cache-sized chunks (C++) for torch's dense GEMM, elsewhere
decompressed whole (torch). With `keep_dense`, it runs F.linear on a dense copy of the weight
there instead: never slower than dense at any row count, for the memory of the copy (which is
rebuilt from the compressed buffers on load, never saved)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FORMATS, SparseFormat, detect_pattern
from ..formats.base import FLOAT_DTYPES, param_names
from ..io.inputs import compress, dense_weight, effective_tensor
from ..ops import linear_from_buffers
from ..ops.bound import BoundKernel, fast_kernel
from .crossover import linear_on_dense_copy, read_buffers, refresh_dense_copy, run_at_crossover, weight_stamp
from .state_dict import (
    as_kept,
    check_float,
    check_shape,
    load_bias,
    missing_placeholders,
    named_layer,
    save_shape,
    unexpected_of,
)

FORMAT_CHOICES = ("auto", "bitmask", "csr", "bsr", "2:4", "n:m", "dense")


def auto_format(w: torch.Tensor) -> str:
    """The format a weight's pattern allows, without measuring (sparsify measures)."""
    pattern = detect_pattern(w)
    if pattern.kind == "dense":
        return "dense"
    if pattern.kind == "n:m":
        return str(pattern)
    if pattern.kind == "block":
        return f"block({pattern.block[0]},{pattern.block[1]})"
    return "csr" if pattern.density <= 0.1 else "bitmask"


class SparseLinear(nn.Module):
    derived_buffers = ("dense_copy",)  # rebuilt from the others on load: sf.save leaves them out

    def __init__(self, weight: SparseFormat | torch.Tensor, bias: torch.Tensor | None = None,
                 dense_above: int | None = None, keep_dense: bool = False):
        super().__init__()
        if isinstance(weight, SparseFormat):
            self.format_name, self.format_params = weight.format_name, weight.params()
            for name, t in weight.tensors().items():
                self.register_buffer(f"weight_{name}", t)
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
            self.format_name, self.format_params = "dense", {}
            self.register_buffer("weight_dense", weight.detach())
        else:
            raise TypeError(f"weight must be a sparseflow format or a 2-D tensor, got {type(weight).__name__}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)  # not shared
        self.dense_above = dense_above
        self._kernel = BoundKernel("linear", self.format_name)
        self._unloaded = False
        self._keep_dense(keep_dense and self.format_name != "dense")

    # ---- construction ----
    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "auto", dense_above: int | None = None) -> SparseLinear:
        """Compresses an nn.Linear (torch prune masks and parametrizations are folded in) into
        `format`: "auto" | "bitmask" | "csr" | "bsr" | "block(bm,bk)" | "2:4" | "n:m" (e.g. "4:8") | "dense"."""
        w = dense_weight(linear)
        bias = effective_tensor(linear, "bias")  # (a pruned bias's attribute can be stale)
        if format == "auto":
            format = auto_format(w)
        if format == "dense":
            return cls(w.clone(), bias, dense_above)
        return cls(compress(w, format), bias, dense_above)

    @classmethod
    def empty(cls, format_name: str, params: dict, shape: tuple[int, int], bias: bool,
              dense_above: int | None = None, keep_dense: bool = False) -> SparseLinear:
        """A module with placeholder buffers; load_state_dict fills (and validates) them."""
        if format_name != "dense" and format_name not in FORMATS:
            raise ValueError(f"unknown format {format_name!r}")
        allowed = set() if format_name == "dense" else param_names(FORMATS[format_name])
        if not isinstance(params, dict) or set(params) - allowed:
            raise ValueError(f"{format_name} takes the parameters {sorted(allowed)}, got {params!r}")
        if dense_above is not None and (isinstance(dense_above, bool) or not isinstance(dense_above, int)
                                        or dense_above < 0):
            raise ValueError(f"dense_above must be None or an int >= 0, got {dense_above!r}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.format_name, mod.format_params = format_name, dict(params)
        for name in ("dense",) if format_name == "dense" else FORMATS[format_name].tensor_names:
            mod.register_buffer(f"weight_{name}", torch.empty(0))
        mod.out_features, mod.in_features = (int(s) for s in shape)
        mod.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None
        mod.dense_above = dense_above
        mod._kernel = BoundKernel("linear", format_name)
        mod._unloaded = True  # placeholders until load_state_dict: forward refuses to run on them
        mod.register_buffer("dense_copy", torch.empty(0) if keep_dense and format_name != "dense" else None,
                            persistent=False)
        mod._dense_copy_of = None
        return mod

    def _keep_dense(self, on: bool) -> None:
        """The dense copy for rows above the crossover (a buffer, so .to() moves it; not persistent:
        state_dict and sf.save leave it out, loading rebuilds it)."""
        if not on:
            self.register_buffer("dense_copy", None, persistent=False)
            self._dense_copy_of = None
            return
        tensors = self._weight_tensors()  # (one snapshot: the copy is of the buffers its stamp names)
        self.register_buffer("dense_copy", self._weight_of(tensors).to_dense(), persistent=False)
        self._dense_copy_of = weight_stamp(tensors.values())

    def rebuild_dense_copy(self) -> None:
        """Makes the dense copy (keep_dense) again from the weight buffers. An eager forward does so by
        itself after an in-place edit of them; a compiled graph reads the copy as it is, so call this
        after such an edit of a compiled model's layer."""
        if self.dense_copy is not None:
            self._keep_dense(True)

    @property
    def weight(self) -> SparseFormat | torch.Tensor:
        """The weight as a format object (or the dense tensor for format "dense")."""
        if self.format_name == "dense":
            return self.weight_dense
        return self._weight_of(self._weight_tensors())

    def _weight_of(self, tensors: dict[str, torch.Tensor]) -> SparseFormat:
        cls = FORMATS[self.format_name]
        return cls.from_tensors((self.out_features, self.in_features), tensors, validate=False, **self.format_params)

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        """The format's buffers by the format's names, read once (crossover.read_buffers)."""
        return read_buffers(self, {name: f"weight_{name}" for name in FORMATS[self.format_name].tensor_names})

    def spec(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this module (see sparseflow.model_io)."""
        return {"type": "SparseLinear", "format": self.format_name, "params": self.format_params,
                "shape": [self.out_features, self.in_features], "bias": self.bias is not None,
                "dense_above": self.dense_above, "keep_dense": self.dense_copy is not None}

    def to_linear(self) -> nn.Linear:
        """Back to a dense nn.Linear with zeros (what other engines load)."""
        w = self.weight if self.format_name == "dense" else self.weight.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ---- compute ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._unloaded:
            raise RuntimeError("SparseLinear holds placeholder buffers (SparseLinear.empty): load a state_dict first")
        if self.format_name == "dense":
            return F.linear(x, self.weight_dense, self.bias)
        return run_at_crossover(x, self.dense_above, self._forward)

    def _forward(self, x: torch.Tensor, batched: str | None) -> torch.Tensor:
        """batched: None for the sparse kernel, else the backend above the crossover (decompress +
        dense GEMM: measured faster at this many rows), or the dense copy where the layer keeps one."""
        if batched is not None and self.dense_copy is not None:
            refresh_dense_copy(self, lambda: self._weight_tensors().values())
            return linear_on_dense_copy(x, self.dense_copy, self.bias)
        # the buffers stamped, validated and run are one snapshot of them (see _weight_tensors)
        tensors = self._weight_tensors()
        if batched is None:
            bias = self.bias
            fn = fast_kernel(self._kernel, x, bias, self.in_features, self.out_features, tensors.values(),
                             lambda: self._weight_of(tensors))
            if fn is not None:
                return fn(x, bias)
        backend = batched or ""
        self._kernel.check_valid(tensors.values(), lambda: self._weight_of(tensors),
                                 (self.out_features, self.in_features))
        return linear_from_buffers(x, self.format_name, tensors, self.format_params,
                                   (self.out_features, self.in_features), self.bias, backend)

    def _apply(self, fn, *args, **kwargs):
        self._kernel.reset()  # .to() and friends replace the buffers: drop the old binding now
        return super()._apply(fn, *args, **kwargs)

    # ---- state dict: buffer sizes depend on the data, so loading replaces them (validated) ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_shape(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        check_shape(self, state_dict, prefix)
        self._kernel.reset()
        names = [n for n in self._buffers if n not in self._non_persistent_buffers_set]
        loaded = not self._unloaded
        incoming = {n: as_kept(state_dict[prefix + n], getattr(self, n), loaded, prefix + n) for n in names
                    if prefix + n in state_dict}
        missing_placeholders(self, prefix, names, incoming)
        if self.format_name != "dense" and incoming:
            # The weight these buffers make once loaded (incoming over the current ones) must be valid:
            # a kernel trusts its sizes and indices.
            tensors = {n.removeprefix("weight_"): incoming.get(n, getattr(self, n)) for n in names}
            with named_layer(prefix):
                FORMATS[self.format_name].from_tensors((self.out_features, self.in_features), tensors,
                                                       validate=True, **self.format_params)
        bias_key = prefix + "bias"
        bias = as_kept(state_dict[bias_key], self.bias, loaded, bias_key) if self.bias is not None and bias_key in \
            state_dict else None
        main = "weight_dense" if self.format_name == "dense" else "weight_values"
        weight = incoming.get(main, getattr(self, main))
        if self.format_name == "dense" and main in incoming:
            if weight.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{prefix}{main} must be float32, bfloat16 or float16, got {weight.dtype}")
            check_float(prefix, main, weight, (self.out_features, self.in_features), weight.dtype)
        real = main in incoming or loaded  # (a placeholder weight has no dtype to match: shapes only)
        kept_bias = bias if bias is not None else (self.bias if loaded else None)
        if kept_bias is not None:
            check_float(prefix, "bias", kept_bias, (self.out_features,), weight.dtype if real else kept_bias.dtype)
        if len(incoming) == len(names):
            self._unloaded = False
        for n, t in incoming.items():
            setattr(self, n, t)
        if bias is not None:
            load_bias(self, bias)
        for n in names:
            if prefix + n not in state_dict and strict:
                missing_keys.append(prefix + n)
        if self.bias is not None and bias_key not in state_dict and strict:
            missing_keys.append(bias_key)
        if strict:
            unexpected_keys.extend(unexpected_of(state_dict, prefix, names + ["bias"] * (self.bias is not None)))
        if self.dense_copy is not None and self.format_name != "dense" and incoming:
            self._keep_dense(True)  # after any weight buffer loaded (in-place edits need this call too)

    def extra_repr(self) -> str:
        w = self.weight
        density = 1.0 if self.format_name == "dense" else w.density
        params = "".join(f", {k}={v}" for k, v in self.format_params.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}{params}, "
                f"density={density:.3f}, bias={self.bias is not None}, dense_above={self.dense_above}"
                + (", keep_dense=True" if self.dense_copy is not None else ""))
