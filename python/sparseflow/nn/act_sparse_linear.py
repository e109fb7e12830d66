"""ActSparseLinear: activation sparsity at run time. Inputs with |x - shift| <= threshold are
skipped; the weight is stored transposed ([in, out], dense or a Bitmask of it) so each active input
reads one contiguous row. With mode-centering (SCAP), `shift` is the calibrated per-input mode:
y = W (x - s) + (b + W s), so the shift folds into the bias and more inputs fall under the
threshold."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Bitmask
from ..formats.base import FLOAT_DTYPES
from ..io.inputs import dense_weight, effective_tensor
from ..ops.bound import BoundKernel, eager_cpu_inference, fast_kernel
from ..ops.cpu import kernel_takes_batch, zero_inactive
from ..ops.linear import act_sparse_from_buffers, subtract_shift
from ..ops.table import rows_of
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


class ActSparseLinear(nn.Module):
    derived_buffers = ("dense_copy",)  # rebuilt from the others on load: sf.save leaves them out

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 0.0,
                 shift: torch.Tensor | None = None, weight_format: str = "dense", dense_above: int | None = 16,
                 keep_dense: bool = False):
        """weight: the dense [out, in] weight (zeros allowed); weight_format "dense" | "bitmask".
        Above `dense_above` rows of x (prefill) the same thresholded product runs as dense GEMMs
        (a bitmask weight decompressed in cache-sized chunks of output columns). With `keep_dense`,
        those rows run the layer's dense product instead, F.linear on a copy of the weight in
        [out, in] layout with no thresholding: activation sparsity then applies to decode rows only,
        as in TEAL, for the memory of the copy. Without it, a bf16 batch on AVX-512 skips the
        inactive inputs (csrc/cpu/kernels/gemm_skip.h: 1.7-1.9x of F.linear at 128 rows and 50%
        active on 2 threads, 1.5-1.7x with a 50% bitmask weight; 1.2-1.3x with 90% active)."""
        super().__init__()
        self.dense_above = dense_above
        if weight_format not in ("dense", "bitmask"):
            raise ValueError(f"weight_format must be 'dense' or 'bitmask', got {weight_format!r}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.threshold = threshold
        self.weight_format = weight_format
        w_t = weight.detach().t().contiguous()
        _check_finite(w_t)
        if weight_format == "bitmask":
            b = Bitmask.from_dense(w_t)
            for name, t in b.tensors().items():
                self.register_buffer(f"weight_t_{name}", t)
        else:
            self.register_buffer("weight_t", w_t)
        effective = bias.detach().clone() if bias is not None else None
        if shift is not None:
            shift = shift.detach().to(weight.dtype)
            folded = weight.float() @ shift.float()  # rounded once, with the bias
            effective = (folded if effective is None else effective.float() + folded).to(weight.dtype)
        self.register_buffer("shift", shift)
        self.bias = None if effective is None else nn.Parameter(effective, requires_grad=False)
        self.folded_bias = bias is None and shift is not None  # the bias holds W s only: the dense layer has none
        self._kernel = BoundKernel("act_sparse_linear", weight_format)
        self._unloaded = False
        self._keep_dense(keep_dense)

    @classmethod
    def empty(cls, shape: tuple[int, int], threshold: float, weight_format: str, bias: bool,
              shift: bool, dense_above: int | None = 16, keep_dense: bool = False,
              folded_bias: bool = False) -> ActSparseLinear:
        """A module with placeholder buffers; load_state_dict fills (and validates) them."""
        if weight_format not in ("dense", "bitmask"):
            raise ValueError(f"weight_format must be 'dense' or 'bitmask', got {weight_format!r}")
        if dense_above is not None and (isinstance(dense_above, bool) or not isinstance(dense_above, int)
                                        or dense_above < 0):
            raise ValueError(f"dense_above must be None or an int >= 0, got {dense_above!r}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.out_features, mod.in_features = (int(s) for s in shape)
        mod.threshold, mod.weight_format, mod.dense_above = threshold, weight_format, dense_above
        names = ["weight_t"] if weight_format == "dense" else [f"weight_t_{n}" for n in Bitmask.tensor_names]
        for name in names:
            mod.register_buffer(name, torch.empty(0))
        mod.register_buffer("shift", torch.empty(0) if shift else None)
        mod.bias = nn.Parameter(torch.empty(0), requires_grad=False) if bias else None
        mod.folded_bias = bool(folded_bias and bias and shift)
        mod._kernel = BoundKernel("act_sparse_linear", weight_format)
        mod._unloaded = True  # placeholders until load_state_dict: forward refuses to run on them
        mod.register_buffer("dense_copy", torch.empty(0) if keep_dense else None, persistent=False)
        mod._dense_copy_of = None
        return mod

    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:  # checked on every assignment: the kernels trust it
        self._threshold = _checked_threshold(value)

    def _keep_dense(self, on: bool) -> None:
        """The [out, in] copy for rows above the crossover (not persistent: loading rebuilds it)."""
        tensors = self._weight_tensors()  # (one snapshot: the copy is of the buffers its stamp names)
        w_t = self._w_t_of(tensors)
        copy = (w_t if isinstance(w_t, torch.Tensor) else w_t.to_dense()).t().contiguous() if on else None
        self.register_buffer("dense_copy", copy, persistent=False)
        self._dense_copy_of = weight_stamp(tensors.values()) if on else None

    def rebuild_dense_copy(self) -> None:
        """Makes the dense copy (keep_dense) again from the weight buffers. An eager forward does so by
        itself after an in-place edit of them; a compiled graph reads the copy as it is, so call this
        after such an edit of a compiled model's layer."""
        if self.dense_copy is not None:
            self._keep_dense(True)

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        """The weight's buffers by the op's names ({"t": w_t}, or the Bitmask's), read once
        (crossover.read_buffers)."""
        if self.weight_format == "dense":
            return read_buffers(self, {"t": "weight_t"})
        return read_buffers(self, {n: f"weight_t_{n}" for n in Bitmask.tensor_names})

    def _w_t_of(self, tensors: dict[str, torch.Tensor]):
        if self.weight_format == "dense":
            return tensors["t"]
        return Bitmask.from_tensors((self.in_features, self.out_features), tensors, validate=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = 0.0, shift: torch.Tensor | None = None,
                    weight_format: str = "dense") -> ActSparseLinear:
        return cls(dense_weight(linear), effective_tensor(linear, "bias"), threshold, shift, weight_format)

    def to_linear(self) -> nn.Linear:
        """The dense layer this one thresholds the inputs of: nn.Linear with the [out, in] weight and
        the original bias (the folded shift taken back out; none where the layer had none)."""
        w_t = self.w_t()
        w = (w_t if isinstance(w_t, torch.Tensor) else w_t.to_dense()).t()
        bias = self.dense_bias(w)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def dense_bias(self, w: torch.Tensor) -> torch.Tensor | None:
        """The dense layer's bias, given its [out, in] weight w: the bias less the folded shift W s,
        or None where the dense layer had no bias (the bias held W s only)."""
        if self.bias is None or self.folded_bias:
            return None
        if self.shift is None:
            return self.bias.detach()
        return (self.bias.float() - w.float() @ self.shift.float()).to(w.dtype)

    def w_t(self):
        return self._w_t_of(self._weight_tensors())

    def spec(self) -> dict:
        return {"type": "ActSparseLinear", "shape": [self.out_features, self.in_features],
                "threshold": self.threshold, "weight_format": self.weight_format, "bias": self.bias is not None,
                "shift": self.shift is not None, "dense_above": self.dense_above,
                "keep_dense": self.dense_copy is not None, "folded_bias": self.folded_bias}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._unloaded:
            raise RuntimeError("ActSparseLinear holds placeholder buffers (ActSparseLinear.empty): load a state_dict "
                               "first")
        if self.shift is not None:  # (an op of its own under a compiler: see subtract_shift)
            if isinstance(x, torch.Tensor) and x.dtype != self.shift.dtype:  # x - shift would promote x
                raise TypeError(f"x is {x.dtype} but the weight is {self.shift.dtype}; convert one of them")
            x = subtract_shift(x, self.shift) if torch.compiler.is_compiling() else x - self.shift
        return run_at_crossover(x, self.dense_above, self._forward)

    def _forward(self, x: torch.Tensor, batched: str | None) -> torch.Tensor:
        """batched: None for the kernel, else the backend above the crossover (many rows: one
        thresholded dense GEMM beats row-by-row skipping), or the dense copy where the layer keeps one."""
        if batched is not None and self.dense_copy is not None:  # the dense layer at prefill (see __init__)
            refresh_dense_copy(self, lambda: self._weight_tensors().values())
            return linear_on_dense_copy(x, self.dense_copy, self.bias)
        # (a batch the C++ kernel runs itself: the batched path would call that same kernel)
        # the buffers stamped, validated and run are one snapshot of them (see _weight_tensors)
        tensors = self._weight_tensors()
        if batched is None or (x.is_cpu and not torch.compiler.is_compiling()
                               and kernel_takes_batch(x.dtype, rows_of(x))):
            bias = self.bias
            fn = fast_kernel(self._kernel, x, bias, self.in_features, self.out_features, tensors.values(),
                             lambda: self._w_t_of(tensors), (self.in_features, self.out_features))
            if fn is not None:
                return fn(x, self.threshold, bias)
        backend = batched or ""
        self._kernel.check_valid(tensors.values(), lambda: self._w_t_of(tensors), (self.in_features, self.out_features))
        return act_sparse_from_buffers(x, self.weight_format, tensors, self.out_features, self.threshold, self.bias,
                                       backend)

    def _apply(self, fn, *args, **kwargs):
        self._kernel.reset()  # .to() and friends replace the buffers: drop the old binding now
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_shape(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        check_shape(self, state_dict, prefix)
        self._kernel.reset()
        persistent = [n for n in self._buffers if n not in self._non_persistent_buffers_set]
        loaded = not self._unloaded
        incoming = {n: as_kept(state_dict[prefix + n], getattr(self, n), loaded, prefix + n) for n in persistent
                    if prefix + n in state_dict}
        names = [f"weight_t_{n}" for n in Bitmask.tensor_names] if self.weight_format == "bitmask" else ["weight_t"]
        missing_placeholders(self, prefix, names, incoming)
        if any(n in incoming for n in names):
            # The weight these buffers make once loaded (incoming over the current ones) must be valid
            # before any is assigned: a kernel trusts their sizes, and a refused load changes nothing.
            weight = {n: incoming.get(n, getattr(self, n)) for n in names}
            _check_finite(weight["weight_t_values" if self.weight_format == "bitmask" else "weight_t"])
            if self.weight_format == "bitmask":
                with named_layer(prefix):
                    Bitmask.from_tensors((self.in_features, self.out_features),
                                         {n.removeprefix("weight_t_"): t for n, t in weight.items()}, validate=True)
            elif tuple(weight["weight_t"].shape) != (self.in_features, self.out_features):
                raise ValueError(f"{prefix}weight_t must have shape ({self.in_features}, {self.out_features}), "
                                 f"got {tuple(weight['weight_t'].shape)}")
        main = "weight_t_values" if self.weight_format == "bitmask" else "weight_t"
        weight = incoming.get(main, getattr(self, main))
        if weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{prefix}{main} must be float32, bfloat16 or float16, got {weight.dtype}")
        bias = as_kept(state_dict[prefix + "bias"], self.bias, loaded, prefix + "bias") if self.bias is not None and \
            prefix + "bias" in state_dict else None
        real = main in incoming or loaded  # (a placeholder weight has no dtype to match: shapes only)
        for name, t, shape in (("shift", incoming.get("shift"), (self.in_features,)), ("bias", bias,
                                                                                    (self.out_features,))):
            if t is not None:
                check_float(prefix, name, t, shape, weight.dtype if real else t.dtype)
        for n in persistent:
            if n in incoming:
                setattr(self, n, incoming[n])
            elif strict and getattr(self, n) is not None:
                missing_keys.append(prefix + n)
        if strict:
            unexpected_keys.extend(unexpected_of(state_dict, prefix, persistent + ["bias"] * (self.bias is not None)))
            if self.bias is not None and prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
        any_loaded = any(n in incoming for n in names)
        if all(n in incoming for n in names):
            self._unloaded = False
        if bias is not None:
            load_bias(self, bias)
        if self.dense_copy is not None and any_loaded:
            self._keep_dense(True)  # after any weight buffer loaded (in-place edits need this call too)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold:.4g}, "
                f"weight_format={self.weight_format}, shift={self.shift is not None}"
                + (", keep_dense=True" if self.dense_copy is not None else ""))


def _checked_threshold(threshold: float) -> float:
    """The threshold as a float: >= 0 (every path compares magnitudes with it; a NaN or negative one
    would make the paths disagree), -0.0 as +0.0."""
    t = float(threshold)
    if not t >= 0.0:
        raise ValueError(f"threshold must be >= 0, got {t}")
    return t + 0.0


def _check_finite(weight: torch.Tensor) -> None:
    """An activation-sparse layer skips the weight rows of its inactive inputs: an inf or NaN there
    would reach the output on the paths that multiply the zeros (batches, the reference) and not on
    the one that skips them, so such a weight is refused."""
    if weight.is_floating_point() and weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError("ActSparseLinear needs a finite weight: it holds inf or NaN (an inactive input skips its "
                         "weight row, so the result would depend on the path)")


def _skip_inactive(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with the inputs an activation-sparse product skips (|x| <= threshold, compared in x's
    dtype; NaN and inf stay) set to zero: one C++ pass in eager CPU inference (into a scratch
    buffer: valid until the next call on this thread), else torch."""
    if eager_cpu_inference(x, None) and x.dim() >= 1 and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return zero_inactive(x.reshape(-1, x.shape[-1]), threshold, reuse=True).view(x.shape)  # F.linear consumes it
    return torch.where(x.abs() <= threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)


def input_modes(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Per-input-feature mode of calibration inputs x [samples, in] (histogram peak, SCAP)."""
    x = x.float()
    lo, hi = x.min(0).values, x.max(0).values
    width = (hi - lo).clamp_min(1e-12) / bins
    idx = ((x - lo) / width).long().clamp_(0, bins - 1)
    counts = torch.zeros(x.shape[1], bins, dtype=torch.int64)
    counts.scatter_add_(1, idx.t().contiguous(), torch.ones_like(idx.t(), dtype=torch.int64))
    peak = counts.argmax(1)
    return lo + (peak.float() + 0.5) * width


def threshold_for(x: torch.Tensor, sparsity: float, shift: torch.Tensor | None = None) -> float:
    """The magnitude below which `sparsity` of the (shifted) calibration inputs fall (TEAL)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {sparsity}")
    a = (x.float() - (0 if shift is None else shift.float())).abs().flatten()
    if sparsity == 0.0:
        return 0.0
    k = max(1, int(sparsity * a.numel()))
    return float(a.kthvalue(k).values)
