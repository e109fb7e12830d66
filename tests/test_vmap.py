"""torch.func.vmap over the sparse ops and modules: a batch dimension of x is one more leading
dimension of rows (every op takes x of shape [..., K]); batching a weight or a bias has no
kernel, and the error names the argument."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_2x
from torch import nn

import sparseflow as sf
from sparseflow.ops import act_sparse_linear_reference


def pruned_weight(n=40, k=72, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)


def nm_weight(n=40, k=72):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    keep = w.reshape(n, -1, 4).abs().topk(2, dim=-1).indices
    return torch.zeros_like(w).reshape(n, -1, 4).scatter(-1, keep, w.reshape(n, -1, 4).gather(-1, keep)).reshape(n, k)


FORMATS = {
    "bitmask": lambda: sf.Bitmask.from_dense(pruned_weight()),
    "csr": lambda: sf.CSR.from_dense(pruned_weight(density=0.1)),
    "bsr": lambda: sf.BSR.from_dense(pruned_weight(32, 64).reshape(2, 16, 4, 16).mul(
        torch.rand(2, 1, 4, 1, generator=torch.Generator().manual_seed(2)) < 0.5).reshape(32, 64), (16, 16)),
    "2:4": lambda: sf.NM.from_dense(nm_weight(), 2, 4),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("in_dim", [0, 1])
def test_vmap_of_linear_matches_the_reference(fmt, in_dim):
    w = FORMATS[fmt]()
    n, k = w.shape
    bias = torch.randn(n)
    xs = torch.randn(5, 3, k)
    batched = xs.movedim(0, in_dim)
    y = torch.func.vmap(lambda x: sf.ops.linear(x, w, bias), in_dims=in_dim)(batched)
    dense = w.to_dense()
    ref64 = F.linear(xs.double(), dense.double(), bias.double())
    assert_close_2x(y, ref64, F.linear(xs, dense, bias))


@pytest.mark.parametrize("weight_format", ["dense", "bitmask"])
def test_vmap_of_act_sparse_linear_matches_the_reference(weight_format):
    w_t = pruned_weight().t().contiguous()
    arg = w_t if weight_format == "dense" else sf.Bitmask.from_dense(w_t)
    bias = torch.randn(40)
    xs = torch.randn(4, 2, 72)
    y = torch.func.vmap(lambda x: sf.ops.act_sparse_linear(x, arg, 0.5, bias))(xs)
    ref64 = act_sparse_linear_reference(xs.double(), w_t.double(), 0.5, bias.double())
    assert_close_2x(y, ref64, act_sparse_linear_reference(xs, w_t, 0.5, bias))


def test_vmap_of_sparse_modules():
    torch.manual_seed(0)
    lin = nn.Linear(72, 40)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(40, 72) < 0.5)
    xs = torch.randn(6, 3, 72)
    for module in (sf.SparseLinear.from_linear(lin, format="bitmask"), sf.ActSparseLinear.from_linear(lin, 0.0)):
        with torch.no_grad():
            y = torch.func.vmap(module)(xs)
            assert torch.allclose(y, module(xs), atol=1e-6)  # the same rows, batched by vmap or not
        assert torch.allclose(y, lin(xs), atol=1e-4)


def test_vmap_over_a_bias_or_weight_is_refused_by_name():
    w = FORMATS["bitmask"]()
    x = torch.randn(3, 72)
    with pytest.raises(NotImplementedError, match="only x may be batched, not bias"):
        torch.func.vmap(lambda b: sf.ops.linear(x, w, b))(torch.randn(4, 40))
    w_t = pruned_weight().t().contiguous()
    with pytest.raises(NotImplementedError, match="only x may be batched, not w_t"):
        torch.func.vmap(lambda wt: sf.ops.act_sparse_linear(x, wt, 0.5))(torch.stack([w_t, w_t]))


@pytest.mark.parametrize("make", [lambda lin: sf.SparseLinear.from_linear(lin, format="bitmask"),
                                  lambda lin: sf.ActSparseLinear.from_linear(lin, 0.1)])
def test_vmap_over_stacked_module_weights_is_refused_by_name(make):
    """Model ensembling (stack_module_state + functional_call) batches the weights, not x."""
    lin = nn.Linear(72, 40, bias=False)
    mods = [make(lin), make(lin)]
    params, buffers = torch.func.stack_module_state(mods)

    def call(p, b, x):
        return torch.func.functional_call(mods[0], (p, b), (x,))

    with pytest.raises(NotImplementedError, match="only x may be batched, not (values|w_t)"):
        torch.func.vmap(call, in_dims=(0, 0, None))(params, buffers, torch.randn(3, 72))


def _modules():
    mods = {}
    for fmt, make in FORMATS.items():
        w = make()
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w.to_dense())
        mods[fmt] = (sf.SparseLinear.from_linear(lin, format=fmt), lin)
    w = pruned_weight()
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    for wf in ("dense", "bitmask"):
        mods[f"act-{wf}"] = (sf.ActSparseLinear.from_linear(lin, threshold=0.5, weight_format=wf), lin)
    return mods


@pytest.mark.parametrize("name", ["bitmask", "csr", "bsr", "2:4", "act-dense", "act-bitmask"])
def test_forward_mode_and_func_gradients_match_the_dense_layer(name):
    """torch.func.jvp, dual tensors, torch.func.grad and jacrev: custom ops have no rule for them (a jvp
    saw a zero tangent, grad raised inside torch), so the modules run the plain-torch reference."""
    import torch.autograd.forward_ad as fwAD

    mod, lin = _modules()[name]
    x, v = torch.randn(5, lin.in_features), torch.randn(5, lin.in_features)
    threshold = 0.5 if name.startswith("act") else -1.0
    if name.startswith("act"):  # skipped inputs have no derivative; x away from the threshold
        x = x.sign() * (x.abs() + 0.6) * (torch.rand_like(x) < 0.5)

    def dense(x):
        return F.linear(torch.where(x.abs() > threshold, x, 0.0), lin.weight.detach(), lin.bias.detach())

    out, tangent = torch.func.jvp(mod, (x,), (v,))
    ref_out, ref_tangent = torch.func.jvp(dense, (x,), (v,))
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(tangent, ref_tangent, atol=1e-5)
    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(mod(fwAD.make_dual(x, v))).tangent
    assert dual_tangent is not None and torch.allclose(dual_tangent, ref_tangent, atol=1e-5)
    g = torch.func.grad(lambda x: mod(x).square().sum())(x)
    assert torch.allclose(g, torch.func.grad(lambda x: dense(x).square().sum())(x), atol=1e-4)
    assert torch.allclose(torch.func.jacrev(mod)(x[:2]), torch.func.jacrev(dense)(x[:2]), atol=1e-5)
    assert torch.allclose(torch.func.vmap(mod)(x[None].expand(3, -1, -1)), mod(x).expand(3, -1, -1), atol=1e-5)
    # a gradient over vmap: x is a BatchedTensor there, with the grad transform below it
    xb = x[None].expand(3, -1, -1).contiguous()
    g = torch.func.grad(lambda x: torch.func.vmap(mod)(x).square().sum())(xb)
    assert torch.allclose(g, torch.func.grad(lambda x: torch.func.vmap(dense)(x).square().sum())(xb), atol=1e-4)
    if name.startswith("act"):  # the functional op, with the module's weight
        w_t = mod.w_t()

        def op(x):
            return sf.ops.act_sparse_linear(x, w_t, threshold, mod.bias)
        out, tangent = torch.func.jvp(op, (x,), (v,))
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(tangent, ref_tangent, atol=1e-5)
        g = torch.func.grad(lambda x: op(x).square().sum())(x)
        assert torch.allclose(g, torch.func.grad(lambda x: dense(x).square().sum())(x), atol=1e-4)
        assert torch.allclose(torch.func.jacfwd(op)(x[:2]), torch.func.jacrev(dense)(x[:2]), atol=1e-5)


@pytest.mark.parametrize("name", ["bitmask", "2:4", "act-bitmask"])
def test_compiled_func_transforms_match_the_dense_layer(name):
    """torch.compile around torch.func.grad / jacrev / jvp of a sparse layer: the layer's call runs
    eagerly (a graph break, which fullgraph=True refuses, naming sparseflow), so the transforms see
    the plain-torch reference; vmap and plain compile stay in the graph."""
    mod, lin = _modules()[name]
    threshold = 0.5 if name.startswith("act") else -1.0
    x, v = torch.randn(5, lin.in_features), torch.randn(5, lin.in_features)
    if name.startswith("act"):
        x = x.sign() * (x.abs() + 0.6) * (torch.rand_like(x) < 0.5)

    def dense(x):
        return F.linear(torch.where(x.abs() > threshold, x, 0.0), lin.weight.detach(), lin.bias.detach())

    torch._dynamo.reset()
    g = torch.compile(torch.func.grad(lambda x: mod(x).square().sum()))(x)
    assert torch.allclose(g, torch.func.grad(lambda x: dense(x).square().sum())(x), atol=1e-4)
    jac = torch.compile(lambda x: torch.func.jacrev(mod)(x))(x[:2])
    assert torch.allclose(jac, torch.func.jacrev(dense)(x[:2]), atol=1e-5)
    out, tangent = torch.compile(lambda x, v: torch.func.jvp(mod, (x,), (v,)))(x, v)
    ref_out, ref_tangent = torch.func.jvp(dense, (x,), (v,))
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(tangent, ref_tangent, atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="sparseflow: a sparse op under torch.func"):
        torch.compile(torch.func.grad(lambda x: mod(x).square().sum()), fullgraph=True)(x)
    torch._dynamo.reset()
    batched = torch.compile(torch.func.vmap(mod), fullgraph=True)(x[None].expand(3, -1, -1))
    assert torch.allclose(batched, mod(x).expand(3, -1, -1), atol=1e-5)
