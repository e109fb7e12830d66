"""The eager CPU fast path of sf.ops.linear and the sparse modules: a weight (a module's buffers, or
a format object) is bound to the kernel of the backend row dispatch picks (a row's `bind`,
ops/table.py) once, and each call passes only x, skipping torch's dispatcher, the format object and
the table lookup. Each torch call costs microseconds with cold caches, which is what a layer meets
in a model (the other layers' weights evict its Python state), so the path makes as few as it can:
on the 2-core Zen 4 a cold call of a small layer costs about 85 us beyond its kernel's streaming
time, of which the custom op would add another 40-60 (benchmarks/RESULTS.md).

Anything else takes the custom op: torch.compile, export and tracing modes, autograd, devices other
than the CPU, rows above the layer's crossover, and inputs the op must reject with a message."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.autograd import forward_ad

from . import table


def plain_eager(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Plain eager execution: no compiler, no tracing mode, no forward-mode AD, no tensor subclass,
    no meta x (shapes only: the custom op's fake kernel answers), and neither x nor any of `others`
    (bias, weight buffers) wrapped by a torch.func transform (vmap, grad: their tensors have no data
    pointer).
    (torch.jit.is_tracing and _get_current_dispatch_mode, called through their C functions: each
    Python frame costs microseconds with cold caches. Under torch.compile the check stops at
    is_compiling.)"""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and not x.is_meta and torch._C._len_torch_dispatch_stack() == 0 and forward_ad._current_level < 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in others))


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd must record the op (the weights are fixed buffers: only x and bias count)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def eager_cpu_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A plain CPU tensor in eager mode with no gradient to record."""
    return plain_eager(x, bias) and x.is_cpu and not needs_grad(x, bias)


def stamp(buffers: Iterable[torch.Tensor | None]) -> tuple:
    """Each buffer's address and version counter: what a validated, bound weight is known by. A
    new place or size of a buffer moves its address, an in-place edit (say of a CSR's row_ptr)
    bumps its version, and either way the weight is validated and bound again. Inference tensors
    keep no version counter: their address alone. RuntimeError for a tensor without storage (one
    batched by vmap)."""
    out = []
    for t in buffers:
        if t is not None:
            out.append(t.data_ptr())
            out.append(-1 if t.is_inference() else t._version)
    return tuple(out)


class BoundKernel:
    """A weight's bound kernel, rebuilt whenever the weight's memory changes: a module's buffers
    replaced (load_state_dict, .to(), a new tensor assigned), edited in place, or a format object's
    tensors moved in place (share_memory_(), which pickling for torch.multiprocessing does, or .data
    =). The key is each buffer's stamp (address and version): the storages bound are held, so no
    other tensor can take their addresses while they are bound. Only
    valid weights with contiguous CPU buffers are bound (a copy made here would go stale; a
    placeholder must never reach a kernel). None where the row dispatch picks has no `bind`. Copies
    and pickles of the module drop it (a closure over raw pointers must not travel)."""

    def __init__(self, op: str, format: str):
        self.op, self.format = op, format
        self.reset()

    def reset(self) -> None:
        """Forget the binding (and the memory it holds): modules call this when they replace their
        buffers."""
        self._key: tuple | None = None
        self._fn: Callable | None = None
        self._dtype: torch.dtype | None = None  # x's dtype the fn takes (the weight's)
        self._held: list = []  # the bound buffers' storages
        self._bias: tuple | None = None  # (bias, its address, its storage) last found to fit
        self._valid: tuple | None = None  # (buffer addresses, their storages) last validated

    def check_valid(self, buffers: Iterable[torch.Tensor | None], weight: Callable[[], object],
                    shape: tuple[int, int]) -> None:
        """A ValueError where the buffers do not make a valid weight of `shape`, checked once per
        stamp of the buffers (their storages held meanwhile, so no other tensor takes them). A module's
        own buffers were validated when made or loaded, but functional_call or an assignment can hand
        it another layer's, and the kernels trust sizes and indices. Skipped while compiling or
        tracing (no data) and for tensors without storage (batched by vmap)."""
        if torch.compiler.is_compiling() or torch._C._is_tracing():
            return
        buffers = [t for t in buffers if t is not None]
        if any(t.is_meta for t in buffers):  # shapes only: the ops' fake kernels answer
            return
        try:
            key = stamp(buffers)
        except RuntimeError:
            return
        if self._valid is not None and self._valid[0] == key:
            return
        w = weight()
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"the weight's buffers make a weight of shape {tuple(w.shape)}, not {tuple(shape)}")
        if not isinstance(w, torch.Tensor):
            try:
                with torch._C._DisableFuncTorch():  # inside torch.func transforms: on the plain buffers
                    w._validate()
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"the weight's buffers do not make a valid {self.format} weight: {e}") from e
        if self.op == "act_sparse_linear":
            values = w if isinstance(w, torch.Tensor) else w.values
            with torch._C._DisableFuncTorch():
                finite = values.device.type == "meta" or not values.numel() or bool(torch.isfinite(values).all())
            if not finite:  # the paths that skip an inactive input's row and those that multiply it would differ
                raise ValueError("act_sparse_linear needs a finite weight: w_t holds inf or NaN (an inactive input "
                                 "skips its weight row, so the result would depend on the path)")
        self._valid = (key, [t.untyped_storage() for t in buffers])

    def get(self, x: torch.Tensor, buffers: Iterable[torch.Tensor | None], weight: Callable[[], object],
            shape: tuple[int, int]) -> Callable | None:
        try:
            key = stamp(buffers)
        except RuntimeError:  # a tensor with no storage (batched by vmap): the op path handles it
            return None
        if key != self._key:
            w = weight()
            if x.dtype != w.dtype:  # left unbound: the op refuses this x; one of w's dtype binds
                return None
            self._bind(x, w, [t for t in buffers if t is not None], shape)
            self._key = key
        return self._fn

    def _bind(self, x: torch.Tensor, w, buffers: list[torch.Tensor], shape: tuple[int, int]) -> None:
        self.reset()
        self.check_valid(buffers, lambda: w, shape)
        if not all(t.is_cpu and t.is_contiguous() for t in buffers):
            return
        b = table.select(self.op, self.format, x, w, table.rows_of(x))
        if b.bind is not None:
            self._fn, self._dtype = b.bind(w), w.dtype
            self._held = [t.untyped_storage() for t in buffers]

    def fits(self, bias: torch.Tensor, out_features: int) -> bool:
        """Whether the bias fits the kernel: checked once per bias and address (its storage is held
        meanwhile, so a bias swapped in with .data = always shows a new address)."""
        try:
            address = bias.data_ptr()
        except RuntimeError:  # no storage (batched by vmap): the op path handles it
            return False
        if self._bias is not None and self._bias[0] is bias and self._bias[1] == address:
            return True
        if not (bias.is_cpu and bias.dtype == self._dtype and bias.shape == (out_features,)
                and bias.is_contiguous()):
            return False
        self._bias = (bias, address, bias.untyped_storage())
        return True

    def __getstate__(self) -> dict:
        return {"op": self.op, "format": self.format}

    def __setstate__(self, state: dict) -> None:
        self.op, self.format = state["op"], state["format"]
        self.reset()


def fast_kernel(kernel: BoundKernel, x: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                out_features: int, buffers: Iterable[torch.Tensor | None], weight: Callable[[], object],
                weight_shape: tuple[int, int] | None = None) -> Callable | None:
    """The bound kernel of the weight (`buffers`: all its tensors; `weight()` builds it, of
    `weight_shape`, default (out_features, in_features)) for this call, or None where the custom op
    must run: anything but eager CPU inference on a plain tensor of the weight's dtype and K, or a
    bias that does not fit. Every torch call costs microseconds with cold caches, so the checks
    that only change with the weight (its device, dtype, validity) are made when it is bound, and
    those of a bias once per bias."""
    if not (plain_eager(x) and x.is_cpu):
        return None
    shape = x.shape
    if not shape or shape[-1] != in_features:
        return None
    if (x.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
        return None
    fn = kernel.get(x, buffers, weight, weight_shape or (out_features, in_features))
    if fn is None or x.dtype != kernel._dtype or (bias is not None and not kernel.fits(bias, out_features)):
        return None
    return fn


BOUND_ATTR = "_bound_"  # + op: where bound_for_format keeps a format object's BoundKernel


def unbind(*weights) -> None:
    """Drop the bound kernels kept on format objects (bound_for_format): each one's closure refers
    back to its weight, so a weight left to the cycle collector outlives its last use. For copies
    made only to be timed."""
    for w in weights:
        if not isinstance(w, torch.Tensor):
            for attr in [a for a in w.__dict__ if a.startswith(BOUND_ATTR)]:
                del w.__dict__[attr]  # object.__delattr__ is refused: formats are immutable


# A dense w_t's BoundKernel, kept while the tensor lives (a tensor has no attribute to keep it on):
# by id, with a weak reference that tells a live tensor from a later one of the same id (a
# WeakKeyDictionary would compare tensors with ==).
_DENSE_KERNELS: dict[int, tuple[weakref.ref, BoundKernel]] = {}


def kernel_of(w, op: str = "linear") -> tuple[BoundKernel, tuple]:
    """The BoundKernel kept for a weight the functional ops take, and the weight's buffers: on a
    format object (formats are immutable; the cache is not part of its value, and the cycle it makes
    with the kernel's closure is collected with it), or beside a dense w_t tensor."""
    if isinstance(w, torch.Tensor):
        if torch.compiler.is_compiling():  # no data to bind or check: a fresh one, never kept
            return BoundKernel(op, "dense"), (w,)
        entry = _DENSE_KERNELS.get(id(w))
        if entry is None or entry[0]() is not w:
            if entry is None:
                weakref.finalize(w, _DENSE_KERNELS.pop, id(w), None)
            entry = _DENSE_KERNELS[id(w)] = (weakref.ref(w), BoundKernel(op, "dense"))
        return entry[1], (w,)
    attr = BOUND_ATTR + op
    found = w.__dict__.get(attr)
    if found is None:
        found = (BoundKernel(op, w.format_name), tuple(w.tensors().values()))
        object.__setattr__(w, attr, found)
    return found


def check_weight(w, op: str = "linear") -> None:
    """A ValueError unless w (a format object, or a dense w_t) is a valid weight for op, checked
    once per stamp of its buffers: what every path of the functional ops runs first, since the
    kernels trust its sizes and indices (a format made with validate=False, or edited in place)."""
    kernel, buffers = kernel_of(w, op)
    kernel.check_valid(buffers, lambda: w, tuple(w.shape))


def bound_for_format(x: torch.Tensor, w, bias: torch.Tensor | None, op: str = "linear") -> Callable | None:
    """fast_kernel for a format object or a dense w_t, with the BoundKernel kept for it (kernel_of)."""
    kernel, buffers = kernel_of(w, op)
    k = w.shape[1] if op == "linear" else w.shape[0]
    n = w.shape[0] if op == "linear" else w.shape[1]
    return fast_kernel(kernel, x, bias, k, n, buffers, lambda: w, tuple(w.shape))


def bound_act_sparse(x: torch.Tensor, w_t, bias: torch.Tensor | None) -> Callable | None:
    """The bound act-sparse kernel of a Bitmask or dense w_t."""
    return bound_for_format(x, w_t, bias, "act_sparse_linear")
