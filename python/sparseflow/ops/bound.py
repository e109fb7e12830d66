"""The eager CPU fast path of sf.ops.linear and the sparse modules: a weight (a module's buffers, or
a format object) is bound to the kernel of the backend row dispatch picks (a row's `bind`,
ops/table.py) once, and each call passes only x, skipping torch's dispatcher, the format object and
the table lookup. On the 2-core Zen 4 with a small layer it saves about 25 us per call with cold
caches, which is what a layer meets in a model (the other layers' weights evict its Python state),
and 9-18 us warm: 0-7% of a Llama decode step (benchmarks/RESULTS.md).

Anything else takes the custom op: torch.compile, export and tracing modes, autograd, devices other
than the CPU, rows above the layer's crossover, and inputs the op must reject with a message."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from . import table


def plain_eager(x: torch.Tensor) -> bool:
    """Plain eager execution: no compiler, no tracing mode, no tensor subclass. (torch.jit.is_tracing
    and _get_current_dispatch_mode, called through their C functions: each Python frame costs
    microseconds with cold caches. Under torch.compile the check stops at is_compiling.)"""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0)


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd must record the op (the weights are fixed buffers: only x and bias count)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def eager_cpu_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A plain CPU tensor in eager mode with no gradient to record."""
    return plain_eager(x) and x.is_cpu and not needs_grad(x, bias)


def fits_bound_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                      out_features: int) -> bool:
    """Eager CPU inference with x, the weight's buffers (`weight`: one of them) and the bias all
    matching: the bound kernel takes sizes and dtype from them unchecked, so anything else goes to
    the custom op, which refuses a mismatch with a message."""
    return (
        eager_cpu_inference(x, bias)
        and x.dim() >= 1 and x.shape[-1] == in_features
        and weight.is_cpu and x.dtype == weight.dtype
        and (bias is None or (bias.is_cpu and bias.dtype == x.dtype and bias.shape == (out_features,)
                              and bias.is_contiguous()))
    )


class BoundKernel:
    """A module's bound kernel, rebuilt whenever its buffers change (load_state_dict, .to(), a new
    tensor assigned): the key holds each buffer's address, shape, strides and dtype, so a new buffer
    that reuses a freed one's address but not its layout is never read with the old bounds. None where
    the row dispatch picks has no `bind`. Copies and pickles of the module drop it (a closure over
    raw pointers must not travel)."""

    def __init__(self, op: str, format: str):
        self.op, self.format = op, format
        self._key: tuple | None = None
        self._fn: Callable | None = None

    def get(self, x: torch.Tensor, buffers: Iterable[torch.Tensor], weight: Callable[[], object]) -> Callable | None:
        key = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in buffers if t is not None)
        if key != self._key:
            self._bind(x, weight())
            self._key = key
        return self._fn

    def once(self, x: torch.Tensor, w) -> Callable | None:
        """For a format object: its tensors cannot be swapped, but their memory can move in place
        (share_memory_(), which pickling for torch.multiprocessing does, or .data =), so only the
        data pointers are checked: far cheaper than get's key with cold caches."""
        key = tuple(t.data_ptr() for t in w.tensors().values())
        if key != self._key:
            self._bind(x, w)
            self._key = key
        return self._fn

    def _bind(self, x: torch.Tensor, w) -> None:
        b = table.select(self.op, self.format, x, w, table.rows_of(x))
        self._fn = None if b.bind is None else b.bind(w)

    def __getstate__(self) -> dict:
        return {"op": self.op, "format": self.format, "_key": None, "_fn": None}


def bound_for_format(x: torch.Tensor, w, op: str = "linear") -> Callable | None:
    """The bound kernel of a format object for `op`, kept on the object (formats are immutable; the
    cache is not part of its value, and the cycle it makes with the kernel's closure is collected
    with it)."""
    attr = f"_bound_{op}"
    kernel = w.__dict__.get(attr)
    if kernel is None:
        kernel = BoundKernel(op, w.format_name)
        object.__setattr__(w, attr, kernel)
    return kernel.once(x, w)


def bound_act_sparse(x: torch.Tensor, w_t) -> Callable | None:
    """The bound act-sparse kernel of a Bitmask w_t (kept on it) or a dense w_t (bound per call:
    a tensor has no place to keep it, and binding a dense one costs a few microseconds)."""
    if not isinstance(w_t, torch.Tensor):
        return bound_for_format(x, w_t, "act_sparse_linear")
    b = table.select("act_sparse_linear", "dense", x, w_t, table.rows_of(x))
    return None if b.bind is None else b.bind(w_t)
