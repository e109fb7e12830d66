"""sf.ops.linear and sf.ops.act_sparse_linear as torch.library custom ops (with fake kernels, so
torch.compile(fullgraph=True) and torch.export see through them). Each op takes a format's
buffers as tensors, rebuilds the (already validated) format object and runs the backend that
the table selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType, is_gradtrackingtensor
from torch._functorch.pyfunctorch import coerce_cinterpreter, retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from ..formats import BSR, CSR, FORMATS, NM, Bitmask, SparseFormat
from . import table
from .bound import bound_act_sparse, bound_for_format, check_weight, needs_grad, plain_eager
from .reference import act_sparse_linear_reference

LIB = "sparseflow"


def _run_linear(fmt: str, x: torch.Tensor, w: SparseFormat, bias, backend: str) -> torch.Tensor:
    x2 = x.reshape(table.rows_of(x), x.shape[-1])  # (not -1: K may be 0)
    b = table.select("linear", fmt, x, w, x2.shape[0], backend)
    return b.fn(x2, w, bias).reshape(*x.shape[:-1], w.shape[0])


def _empty_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op(f"{LIB}::linear_bitmask", mutates_args=())
def linear_bitmask(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                   in_features: int, bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    _check(x, in_features, mask.shape[0], values.dtype, values.device, bias)
    w = Bitmask((mask.shape[0], in_features), values, mask, row_offsets, validate=False)
    return _run_linear("bitmask", x, w, bias, backend)


@linear_bitmask.register_fake
def _(x, values, mask, row_offsets, in_features, bias=None, backend=""):
    _check(x, in_features, mask.shape[0], values.dtype, values.device, bias)
    return _empty_out(x, mask.shape[0])


@torch.library.custom_op(f"{LIB}::linear_csr", mutates_args=())
def linear_csr(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
               in_features: int, bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    _check(x, in_features, row_ptr.shape[0] - 1, values.dtype, values.device, bias)
    w = CSR((row_ptr.shape[0] - 1, in_features), values, col_indices, row_ptr, validate=False)
    return _run_linear("csr", x, w, bias, backend)


@linear_csr.register_fake
def _(x, values, col_indices, row_ptr, in_features, bias=None, backend=""):
    _check(x, in_features, row_ptr.shape[0] - 1, values.dtype, values.device, bias)
    return _empty_out(x, row_ptr.shape[0] - 1)


@torch.library.custom_op(f"{LIB}::linear_bsr", mutates_args=())
def linear_bsr(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
               out_features: int, in_features: int, bias: torch.Tensor | None = None,
               backend: str = "") -> torch.Tensor:
    _check(x, in_features, out_features, values.dtype, values.device, bias)
    w = BSR((out_features, in_features), values, col_indices, row_ptr, tuple(values.shape[1:]), validate=False)
    return _run_linear("bsr", x, w, bias, backend)


@linear_bsr.register_fake
def _(x, values, col_indices, row_ptr, out_features, in_features, bias=None, backend=""):
    _check(x, in_features, out_features, values.dtype, values.device, bias)
    return _empty_out(x, out_features)


@torch.library.custom_op(f"{LIB}::linear_nm", mutates_args=())
def linear_nm(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int, in_features: int,
              bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    _check(x, in_features, values.shape[0], values.dtype, values.device, bias)
    w = NM((values.shape[0], in_features), values, index, n, m, validate=False)
    return _run_linear("nm", x, w, bias, backend)


@linear_nm.register_fake
def _(x, values, index, n, m, in_features, bias=None, backend=""):
    _check(x, in_features, values.shape[0], values.dtype, values.device, bias)
    return _empty_out(x, values.shape[0])


@torch.library.custom_op(f"{LIB}::act_sparse_linear_dense", mutates_args=())
def act_sparse_linear_dense(x: torch.Tensor, w_t: torch.Tensor, threshold: float,
                            bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    _check(x, w_t.shape[0], w_t.shape[1], w_t.dtype, w_t.device, bias)
    return _run_act_sparse("dense", x, w_t, w_t.shape[1], threshold, bias, backend)


@act_sparse_linear_dense.register_fake
def _(x, w_t, threshold, bias=None, backend=""):
    _check(x, w_t.shape[0], w_t.shape[1], w_t.dtype, w_t.device, bias)
    return _empty_out(x, w_t.shape[1])


@torch.library.custom_op(f"{LIB}::act_sparse_linear_bitmask", mutates_args=())
def act_sparse_linear_bitmask(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                              out_features: int, threshold: float, bias: torch.Tensor | None = None,
                              backend: str = "") -> torch.Tensor:
    _check(x, mask.shape[0], out_features, values.dtype, values.device, bias)
    w_t = Bitmask((x.shape[-1], out_features), values, mask, row_offsets, validate=False)
    return _run_act_sparse("bitmask", x, w_t, out_features, threshold, bias, backend)


@act_sparse_linear_bitmask.register_fake
def _(x, values, mask, row_offsets, out_features, threshold, bias=None, backend=""):
    _check(x, mask.shape[0], out_features, values.dtype, values.device, bias)
    return _empty_out(x, out_features)


# x - shift (SCAP's mode-centring) as an op a compiler cannot fuse: a compiled backward would
# otherwise recompute x - shift in float32 unrounded and skip other inputs than the forward did.
@torch.library.custom_op(f"{LIB}::subtract_shift", mutates_args=())
def subtract_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x - shift


@subtract_shift.register_fake
def _(x, shift):
    return torch.empty_like(x)


subtract_shift.register_autograd(lambda ctx, grad: (grad, None))


# ---------------------------------------------------------------------------------------------
def _check_bias_type(bias) -> None:
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")


def _check(x: torch.Tensor, in_features: int, out_features: int, dtype: torch.dtype, device, bias) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_bias_type(bias)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if x.dtype != dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {dtype}; convert one of them")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != dtype or bias.device != device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {dtype} on {device}")


_AD_TRANSFORMS = (TransformType.Grad, TransformType.Jvp)


def _ad_transform(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Forward-mode AD (torch.func.jvp, dual tensors) or a torch.func gradient transform (grad, vjp,
    jacrev): custom ops have no rule for them (a jvp saw a zero tangent, grad raised inside torch), so
    these run the plain-torch reference, which every transform differentiates. Under torch.compile
    inside such a transform, the call runs eagerly (a graph break; fullgraph=True refuses it): Dynamo
    cannot trace the reference's decompression there, nor the checks on x."""
    if torch.compiler.is_compiling():
        top = torch._C._functorch.peek_interpreter_stack()  # (what Dynamo can read of the transforms)
        if isinstance(top, torch._C._functorch.CInterpreter) and coerce_cinterpreter(top).key() in _AD_TRANSFORMS:
            torch._dynamo.graph_break("sparseflow: a sparse op under torch.func.grad/jvp/jacrev runs eagerly")
        return False
    return forward_ad._current_level >= 0 or is_gradtrackingtensor(x) or (
        bias is not None and is_gradtrackingtensor(bias)) or _grad_below_vmap()


def _grad_below_vmap() -> bool:
    """A grad or jvp transform under the top one (grad(vmap(f))): x is a BatchedTensor, and the op's
    vmap rule would run the custom op at the gradient's level, which has no rule for it."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return any(i.key() in _AD_TRANSFORMS for i in retrieve_all_functorch_interpreters())


def _constant(make):
    """A weight decompressed outside any torch.func transform (the decompression reads raw data); to
    the transform it is a constant, as the layer's buffers are."""
    with torch._C._DisableFuncTorch():
        return make()


def linear(x: torch.Tensor, w: SparseFormat, bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    """F.linear(x, w.to_dense(), bias) for a compressed weight w; x is [..., K].
    `backend` forces a row of the backend table by name ("cpp", "reference", ...)."""
    if not isinstance(w, SparseFormat):
        raise TypeError(f"w must be a sparseflow format (Bitmask, CSR, BSR, NM), got {type(w).__name__}")
    _check_bias_type(bias)  # (before the bound kernel reads it)
    if backend in ("", "cpp"):
        fn = bound_for_format(x, w, bias)
        if fn is not None:
            return fn(x, bias)
    check_weight(w)
    return linear_from_buffers(x, w.format_name, w.tensors(), w.params(), w.shape, bias, backend)


def linear_from_buffers(x: torch.Tensor, format_name: str, tensors: dict, params: dict, shape: tuple[int, int],
                        bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    """The custom op of a format, called with its (validated) buffers for a weight of `shape`
    (out, in): what modules use in forward, so that torch.compile traces tensors and constants only.
    x is checked against the weight here: the kernels take K from x, and a buffer sized for another
    K would be read out of bounds."""
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2):
        raise TypeError(f"shape must be the weight's (out_features, in_features), got {shape!r}")
    out_features, in_features = shape
    values = tensors["values"]
    _check(x, in_features, out_features, values.dtype, values.device, bias)
    if bias is not None:
        bias = bias.contiguous()
    t = tensors
    if _ad_transform(x, bias):
        w = FORMATS[format_name].from_tensors((out_features, in_features), t, validate=False, **params)
        return F.linear(x, _constant(w.to_dense), bias)
    if plain_eager(x, bias, *t.values()) and not needs_grad(x, bias):  # skip the dispatcher (~15 us)
        w = FORMATS[format_name].from_tensors((out_features, x.shape[-1]), t, validate=False, **params)
        return _run_linear(format_name, x, w, bias, backend)
    if format_name == "bitmask":
        return linear_bitmask(x, t["values"], t["mask"], t["row_offsets"], in_features, bias, backend)
    if format_name == "csr":
        return linear_csr(x, t["values"], t["col_indices"], t["row_ptr"], in_features, bias, backend)
    if format_name == "bsr":
        return linear_bsr(x, t["values"], t["col_indices"], t["row_ptr"], out_features, in_features, bias, backend)
    if format_name == "nm":
        return linear_nm(x, t["values"], t["index"], params["n"], params["m"], in_features, bias, backend)
    raise TypeError(f"no linear op for format {format_name!r}")


def _run_act_sparse(fmt: str, x: torch.Tensor, w_t, n: int, threshold: float, bias, backend: str) -> torch.Tensor:
    x2 = x.reshape(table.rows_of(x), x.shape[-1])  # (not -1: K may be 0)
    b = table.select("act_sparse_linear", fmt, x, w_t, x2.shape[0], backend)
    return b.fn(x2, w_t, threshold, bias).reshape(*x.shape[:-1], n)


def act_sparse_from_buffers(x: torch.Tensor, weight_format: str, tensors: dict, out_features: int, threshold: float,
                            bias: torch.Tensor | None = None, backend: str = "") -> torch.Tensor:
    """The activation-sparse custom op for a dense ({"t": w_t}) or bitmask transposed weight,
    called with its buffers (what ActSparseLinear uses), skipping the dispatcher when eager."""
    w_rows = tensors["t"] if weight_format == "dense" else tensors["mask"]  # one row per input feature
    values = tensors["t"] if weight_format == "dense" else tensors["values"]
    _check(x, w_rows.shape[0], out_features, values.dtype, values.device, bias)
    t = tensors
    if _ad_transform(x, bias):
        w_t = t["t"] if weight_format == "dense" else _constant(
            Bitmask.from_tensors((x.shape[-1], out_features), t, validate=False).to_dense)
        return act_sparse_linear_reference(x, w_t, float(threshold) + 0.0, bias)
    if plain_eager(x, bias, *t.values()) and not needs_grad(x, bias):
        w_t = t["t"] if weight_format == "dense" else Bitmask.from_tensors((x.shape[-1], out_features), t,
                                                                            validate=False)
        return _run_act_sparse(weight_format, x, w_t, out_features, threshold, bias, backend)
    if weight_format == "dense":
        return act_sparse_linear_dense(x, t["t"], threshold, bias, backend)
    return act_sparse_linear_bitmask(x, t["values"], t["mask"], t["row_offsets"], out_features, threshold, bias,
                                     backend)


def act_sparse_linear(x: torch.Tensor, w_t, threshold: float, bias: torch.Tensor | None = None,
                      backend: str = "") -> torch.Tensor:
    """y = x_active @ w_t (+ bias), where inputs with |x| <= threshold (compared in x's dtype, as
    torch compares) are skipped: NaN always counts as active, inf unless the threshold is inf.
    w_t is the transposed weight [K, N]: a dense tensor or a sf.Bitmask of it."""
    threshold = float(threshold) + 0.0  # -0.0 -> +0.0: the kernels compare magnitude bits with its bits
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if isinstance(w_t, torch.Tensor):
        if w_t.dim() != 2:
            raise ValueError(f"w_t must be 2-D [in_features, out_features], got {tuple(w_t.shape)}")
    elif not isinstance(w_t, Bitmask):
        raise TypeError(f"w_t must be a dense tensor or a sf.Bitmask, got {type(w_t).__name__}")
    k, n = w_t.shape
    _check(x, k, n, w_t.dtype, w_t.device, bias)
    if backend in ("", "cpp"):
        fn = bound_act_sparse(x, w_t, bias)
        if fn is not None:
            return fn(x, threshold, bias)
    check_weight(w_t, "act_sparse_linear")
    bias = None if bias is None else bias.contiguous()
    if isinstance(w_t, Bitmask):
        return act_sparse_from_buffers(x, "bitmask", w_t.tensors(), n, threshold, bias, backend)
    return act_sparse_from_buffers(x, "dense", {"t": w_t}, n, threshold, bias, backend)


# ---------------------------------------------------------------------------------------------
# Backward: gradients flow to x and bias (weights are fixed, compressed buffers), so a sparse
# layer inside a model that trains other parts, or under torch.compile with grad enabled, works.
def _bias_grad(grad: torch.Tensor, bias: torch.Tensor | None):
    return None if bias is None else grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


def _register_linear_backward(op, weight_of, n_weight_args: int) -> None:
    """`weight_of(*weight_args)` rebuilds the dense [N, K] weight from the op's buffers (and in_features)."""

    def setup_context(ctx, inputs, output):
        ctx.x_dtype = inputs[0].dtype
        ctx.weight_args = inputs[1 : 1 + n_weight_args]
        ctx.bias = inputs[1 + n_weight_args]

    def backward(ctx, grad):
        w = weight_of(*ctx.weight_args)
        grad_x = (grad.float() @ w.float()).to(ctx.x_dtype)
        return (grad_x, *([None] * n_weight_args), _bias_grad(grad, ctx.bias), None)

    op.register_autograd(backward, setup_context=setup_context)


_register_linear_backward(
    linear_bitmask, lambda v, mask, offs, k: Bitmask((mask.shape[0], k), v, mask, offs, validate=False).to_dense(), 4)
_register_linear_backward(
    linear_csr, lambda v, col, ptr, k: CSR((ptr.shape[0] - 1, k), v, col, ptr, validate=False).to_dense(), 4)
_register_linear_backward(
    linear_bsr, lambda v, col, ptr, n, k: BSR((n, k), v, col, ptr, tuple(v.shape[1:]), validate=False).to_dense(), 5)
_register_linear_backward(
    linear_nm, lambda v, idx, n, m, k: NM((v.shape[0], k), v, idx, n, m, validate=False).to_dense(), 5)


def _act_dense_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.weight_args = inputs[1:2]
    ctx.threshold, ctx.bias = inputs[2], inputs[3]


def _act_dense_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    (w_t,) = ctx.weight_args
    active = ~(x.abs() <= ctx.threshold)  # skipped inputs get no gradient, as in the forward
    grad_x = ((grad.float() @ w_t.float().t()) * active).to(x.dtype)
    return grad_x, None, None, _bias_grad(grad, ctx.bias), None


def _act_bitmask_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.weight_args = inputs[1:5]
    ctx.threshold, ctx.bias = inputs[5], inputs[6]


def _act_bitmask_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    values, mask, offs, n = ctx.weight_args
    w_t = Bitmask((x.shape[-1], n), values, mask, offs, validate=False).to_dense()
    active = ~(x.abs() <= ctx.threshold)
    grad_x = ((grad.float() @ w_t.float().t()) * active).to(x.dtype)
    return grad_x, None, None, None, None, None, _bias_grad(grad, ctx.bias), None


act_sparse_linear_dense.register_autograd(_act_dense_backward, setup_context=_act_dense_setup)
act_sparse_linear_bitmask.register_autograd(_act_bitmask_backward, setup_context=_act_bitmask_setup)


# ---------------------------------------------------------------------------------------------
# vmap: every op takes x of shape [..., K], so a batch dimension of x is one more leading dim.
# The weight (and bias) are fixed buffers: batching them has no kernel, and says so.
def _register_vmap(op) -> None:
    def rule(info, in_dims, x, *rest):
        batched = [i for i, d in enumerate(in_dims[1:], start=1) if d is not None]
        if batched:
            names = [a.name for a in op._opoverload._schema.arguments]
            raise NotImplementedError(f"{LIB}::{op._name} under vmap: only x may be batched, not "
                                      f"{', '.join(names[i] for i in batched)} (the weight and bias are fixed buffers)")
        return op(x.movedim(in_dims[0], 0), *rest), 0

    op.register_vmap(rule)


for _op in (linear_bitmask, linear_csr, linear_bsr, linear_nm, act_sparse_linear_dense, act_sparse_linear_bitmask):
    _register_vmap(_op)
