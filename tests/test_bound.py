"""The modules' eager CPU fast path (ops/bound.py): the bound kernel gives what the custom op gives,
is rebuilt when the buffers change, and steps aside wherever the op must run."""

import copy
import importlib
import pickle

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.nn import act_sparse_linear, sparse_linear

FORMATS = ["bitmask", "csr", "bsr", "2:4"]


def pruned_linear(k=70, n=45, density=0.5, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(sf.NM.from_dense(lin.weight.float(), 2, 4, prune=True).to_dense().to(dtype))
        lin.weight.mul_(torch.rand(n, k) < density * 2)  # below 2:4's density, still 2:4-shaped
    return lin


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the modules' calls of the custom-op path."""
    calls = []

    def counted(module, original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, original.__name__, wrapper)

    counted(sparse_linear, sparse_linear.linear_from_buffers)
    counted(act_sparse_linear, act_sparse_linear.act_sparse_from_buffers)
    return calls


def modules(fmt, dtype=torch.float32):
    lin = pruned_linear(dtype=dtype)
    if fmt.startswith("act"):
        return sf.ActSparseLinear.from_linear(lin, 0.4, weight_format=fmt.split("/")[1])
    return sf.SparseLinear.from_linear(lin, fmt)


@pytest.mark.parametrize("fmt", FORMATS + ["act/dense", "act/bitmask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_kernel_equals_the_op(fmt, dtype, op_calls):
    m = modules(fmt, dtype)
    x = torch.randn(3, 2, 70, dtype=dtype)[:, 1]  # non-contiguous rows
    x[1, 7] = float("nan")  # the NaN row is recomputed by the reference on both paths
    with torch.no_grad():
        fast = m(x)
    assert not op_calls and fast.shape == (3, 45)
    slow = m(x.clone().requires_grad_()).detach()  # autograd takes the custom op
    assert op_calls
    assert torch.equal(fast.isnan(), slow.isnan()) and fast[1].isnan().all()
    assert torch.equal(fast[[0, 2]], slow[[0, 2]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_new_buffers_rebind(fmt, op_calls):
    """load_state_dict with another weight (other sizes), then .to(bf16): each call reads the
    buffers the module holds now."""
    m, other = modules(fmt), sf.SparseLinear.from_linear(pruned_linear(density=0.2, seed=1), fmt)
    x = torch.randn(4, 70)
    with torch.no_grad():
        m(x)
        m.load_state_dict(other.state_dict())
        assert torch.equal(m(x), other(x))
        m.to(torch.bfloat16)
        other.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        assert torch.equal(m(xb), other(xb))
    assert not op_calls


def test_buffer_contents_changed_in_place_are_read():
    m = sf.SparseLinear.from_linear(pruned_linear(), "bitmask")
    m.bias = None
    x = torch.randn(2, 70)
    with torch.no_grad():
        y = m(x)
        m.weight_values.mul_(2)
        assert torch.allclose(m(x), 2 * y)


@pytest.mark.parametrize("fmt", FORMATS + ["act/dense", "act/bitmask"])
@pytest.mark.parametrize("grad", [False, True])
def test_inputs_the_weight_does_not_fit_are_refused(fmt, grad, op_calls):
    """Another dtype or K falls through to the op, which refuses it (the kernels take K and the
    dtype from x: a weight sized for 70 inputs must never be read as if it had 4000)."""
    m = modules(fmt)
    with torch.set_grad_enabled(grad):
        bad = (torch.randn(2, 70, dtype=torch.bfloat16), torch.randn(2, 69), torch.randn(2, 4000), torch.randn(70)[0])
        for x in bad:
            with pytest.raises((TypeError, ValueError), match="in_features=70|weight is torch.float32"):
                m(x.requires_grad_(grad))
    assert len(op_calls) == 4


def test_the_op_runs_where_the_fast_path_must_not(op_calls):
    m = modules("bitmask")
    with torch.no_grad():
        m.dense_above = 2
        m(torch.randn(3, 70))  # above the crossover: the batched row, through the op
        assert len(op_calls) == 1
        m.dense_above = None
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(torch.ones(1, 70)), m(torch.ones(1, 70)), atol=1e-5)


@pytest.mark.parametrize("weight", ["dense", "bitmask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_batches_the_kernel_runs_itself_take_the_fast_path(weight, dtype, op_calls):
    """Above its crossover an act-sparse layer runs the batched path, which hands a batch to the C++
    kernel where that kernel runs it as its own GEMM (bf16 with AVX-512 BF16): the module then
    calls its bound kernel directly. Elsewhere (fp32, or no BF16 dot products) the op runs."""
    from sparseflow.ops.cpu import act_sparse_batch_rows

    m = modules(f"act/{weight}", dtype)
    m.dense_above = 2
    first = act_sparse_batch_rows(dtype)
    rows = max(first, 3)
    x = torch.randn(rows, 70, dtype=dtype)
    x[1, 7] = float("nan")
    with torch.no_grad():
        out = m(x)
    assert len(op_calls) == (0 if first > 0 else 1)
    reference = sf.ops.act_sparse_linear(x, m.w_t(), m.threshold, m.bias, backend="batched")
    assert torch.equal(out.isnan(), reference.isnan()) and out[1].isnan().all()
    assert torch.equal(out[[0, *range(2, rows)]], reference[[0, *range(2, rows)]])
    if dtype == torch.bfloat16 and weight == "dense":  # the same rows compile without a graph break
        torch._dynamo.reset()  # (other tests compile this forward too: stay clear of the recompile limit)
        with torch.no_grad():
            compiled = torch.compile(m, fullgraph=True)(x)
        assert torch.equal(compiled[[0, *range(2, rows)]], out[[0, *range(2, rows)]])


@pytest.mark.parametrize("fmt", ["bitmask", "act/bitmask"])
def test_copies_and_pickles_drop_the_bound_kernel(fmt):
    m = modules(fmt)
    x = torch.randn(2, 70)
    with torch.no_grad():
        y = m(x)
        assert m._kernel._fn is not None
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):  # pickle of our own object, in memory
            assert clone._kernel._fn is None
            assert torch.equal(clone(x), y)


def test_weights_on_another_device_or_a_bad_bias_take_the_op(op_calls):
    """The bound kernel would read them as CPU memory of the expected size: the op refuses instead."""
    m = modules("bitmask")
    x = torch.randn(2, 70)
    with torch.no_grad():
        meta = copy.deepcopy(m).to("meta")
        with pytest.raises((ValueError, RuntimeError, TypeError), match="meta|device"):
            meta(x)
        state = m.state_dict()
        state["bias"] = torch.ones(1)
        with pytest.raises(ValueError, match=r"bias must be torch.float32 of shape \(45,\)"):
            m.load_state_dict(state)  # refused at load
        m.bias = torch.nn.Parameter(torch.ones(1), requires_grad=False)  # assigned: refused by the op
        with pytest.raises(ValueError, match="bias must have shape"):
            m(x)
    assert len(op_calls) == 2  # (the op refuses both: a CPU x for a meta weight, and the bias)


def test_jit_trace_records_the_op():
    m = modules("bitmask")
    x = torch.randn(2, 70)
    with torch.no_grad():
        traced = torch.jit.trace(m, x, check_trace=False)
        other = torch.randn(2, 70)
        assert torch.allclose(traced(other), m(other), atol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr", "nm"])
def test_ops_linear_binds_each_format_object_once(fmt):
    lin = pruned_linear()
    w = sf.SparseLinear.from_linear(lin, "2:4" if fmt == "nm" else fmt).weight
    bias = torch.randn(90)[::2]  # non-contiguous: the op path makes it contiguous
    x = torch.randn(3, 70)
    with torch.no_grad():
        y = sf.ops.linear(x, w, bias)
        kernel = w.__dict__["_bound_linear"][0]
        assert kernel._bias is None  # the non-contiguous bias was refused: the op took the call
        y2 = sf.ops.linear(x, w, bias.contiguous())
        fn = kernel._fn
        assert fn is not None and torch.equal(y, y2) and kernel._bias is not None
        sf.ops.linear(x, w, bias.contiguous())
        assert kernel._fn is fn  # bound once
        ref = sf.ops.linear(x, w, bias, backend="reference")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert copy.deepcopy(w).__dict__["_bound_linear"][0]._fn is None


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr", "nm"])
def test_a_bound_format_object_follows_its_memory(fmt):
    """share_memory_() (what pickling for torch.multiprocessing does) moves a tensor's memory in
    place and frees the old one: the kernel bound to the old pointers must not read it."""
    lin = pruned_linear(k=256, n=512)
    w = sf.SparseLinear.from_linear(lin, "2:4" if fmt == "nm" else fmt).weight
    x = torch.randn(1, 256)
    with torch.no_grad():
        sf.ops.linear(x, w)  # binds
        before = tuple(t.data_ptr() for t in w.tensors().values())
        for t in w.tensors().values():
            t.share_memory_()
        assert tuple(t.data_ptr() for t in w.tensors().values()) != before
        torch.testing.assert_close(sf.ops.linear(x, w), sf.ops.linear(x, w, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight", ["dense", "bitmask"])
def test_ops_act_sparse_linear_takes_the_bound_kernel(weight, monkeypatch):
    ops_linear = importlib.import_module("sparseflow.ops.linear")  # the module: sf.ops.linear is the function
    op_calls = []  # calls of the table's backend rows (through the custom op, or without it when eager)
    run = ops_linear._run_act_sparse
    monkeypatch.setattr(ops_linear, "_run_act_sparse", lambda *a, **k: op_calls.append(1) or run(*a, **k))
    w = pruned_linear().weight.detach()
    w_t = w.t().contiguous()
    if weight == "bitmask":
        w_t = sf.Bitmask.from_dense(w_t)
    bias = torch.randn(90)[::2]
    x = torch.randn(3, 70)
    x[1, 5] = float("inf")
    with torch.no_grad():
        y_op = sf.ops.act_sparse_linear(x, w_t, 0.4, bias)  # non-contiguous bias: the table's row
        assert len(op_calls) == 1
        y = sf.ops.act_sparse_linear(x, w_t, 0.4, bias.contiguous())
        assert len(op_calls) == 1  # the bound kernel, not the table's row
        if weight == "bitmask":
            fn = w_t.__dict__["_bound_act_sparse_linear"][0]._fn
            sf.ops.act_sparse_linear(x, w_t, 0.4, bias.contiguous())
            assert fn is not None and w_t.__dict__["_bound_act_sparse_linear"][0]._fn is fn  # bound once
        ref = sf.ops.act_sparse_linear(x, w_t, 0.4, bias, backend="reference")
    torch.testing.assert_close(y, y_op, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["bitmask", "act/dense"])
def test_fast_path_takes_any_leading_dims(fmt, op_calls):
    """x [B, T, K] goes to the kernel as B*T rows without a reshape; a NaN row is still recomputed."""
    m = modules(fmt)
    x = torch.randn(2, 3, 70)
    x[1, 2, 5] = float("nan")
    with torch.no_grad():
        fast = m(x)
        flat = m(x.reshape(6, 70))
    assert not op_calls and fast.shape == (2, 3, 45)
    assert torch.equal(fast.reshape(6, 45).isnan(), flat.isnan()) and fast[1, 2].isnan().all()
    assert torch.equal(fast.reshape(6, 45)[:5], flat[:5])


def test_a_bias_accepted_once_is_still_checked_for_grad(op_calls):
    """The fast path remembers a bias that fits, but autograd on it must still take the op."""
    m = modules("csr")
    x = torch.randn(2, 70)
    with torch.no_grad():
        m(x)
    assert not op_calls
    m.bias.requires_grad_(True)
    y = m(x)
    assert op_calls and y.requires_grad


def test_a_refused_first_call_does_not_disable_the_fast_path(op_calls):
    m = modules("bitmask")
    with torch.no_grad():
        with pytest.raises(TypeError):
            m(torch.randn(2, 70, dtype=torch.float64))
        calls = len(op_calls)
        m(torch.randn(2, 70))
    assert len(op_calls) == calls and m._kernel._fn is not None


def test_a_bias_swapped_with_data_is_checked_again(op_calls):
    """The fast path remembers a bias that fits by identity and address: one swapped in with .data =
    (another size or dtype) must be refused with the op's message, never read by the kernel."""
    m = modules("csr")
    x = torch.randn(2, 70)
    with torch.no_grad():
        m(x)
        m.bias.data = torch.tensor([1000.0])
        with pytest.raises(ValueError, match="bias must have shape"):
            m(x)
        m.bias.data = torch.randn(45).bfloat16()
        with pytest.raises(TypeError, match="bias is torch.bfloat16"):
            m(x)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "bitmask", "nm"])
def test_placeholder_modules_refuse_to_run(fmt):
    w = torch.randn(32, 64) * (torch.rand(32, 64) < 0.3)
    source = {"csr": lambda: sf.CSR.from_dense(w), "bsr": lambda: sf.BSR.from_dense(w, (4, 4)),
              "bitmask": lambda: sf.Bitmask.from_dense(w), "nm": lambda: sf.NM.from_dense(w, 2, 4, prune=True)}[fmt]()
    m = sf.SparseLinear.empty(fmt, source.params(), (32, 64), bias=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="placeholder"):
        m(torch.randn(2, 64))
    m.load_state_dict(sf.SparseLinear(source, None).state_dict())
    with torch.no_grad():
        assert m(torch.randn(2, 64)).shape == (2, 32)


def test_a_partial_load_that_breaks_the_weight_is_refused():
    m = sf.SparseLinear.from_linear(pruned_linear(), "csr")
    other = sf.SparseLinear.from_linear(pruned_linear(density=0.2, seed=1), "csr")
    with pytest.raises(ValueError, match="csr"):
        m.load_state_dict({"weight_values": other.weight_values}, strict=False)


def test_loaded_buffers_are_contiguous_and_edits_are_read():
    """load_state_dict of a transposed (non-contiguous) weight stores a contiguous copy, so the bound
    kernel reads the module's buffer itself and sees in-place edits."""
    lin = pruned_linear()
    m = sf.ActSparseLinear.from_linear(lin, 0.0)
    m.load_state_dict({"weight_t": lin.weight.detach().t(), "bias": lin.bias.detach()}, strict=False)
    assert m.weight_t.is_contiguous()
    x = torch.randn(1, 70)
    with torch.no_grad():
        y0 = m(x)
        m.weight_t.mul_(2.0)
        torch.testing.assert_close(m(x), 2 * y0 - lin.bias.detach(), rtol=1e-5, atol=1e-5)


def test_output_stays_on_the_cpu_under_another_default_device():
    m = modules("bitmask")
    x = torch.randn(2, 70)
    with torch.no_grad():
        ref = m(x)
        with torch.device("meta"):
            y = m(x)
    assert y.device.type == "cpu" and torch.equal(y, ref)
