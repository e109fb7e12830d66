"""Weights changed after they were checked (edited in place, or built with validate=False) and bad
calibration data: refused with a ValueError that names the problem on every path (the bound fast
path, a named backend, autograd), never a crash or an answer that depends on the path."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import pruned_linear
from torch import nn

import sparseflow as sf

# format -> (build from a dense weight, the index buffer to corrupt, the module's name of it)
FORMATS = {
    "csr": (sf.CSR.from_dense, "row_ptr"),
    "bitmask": (sf.Bitmask.from_dense, "row_offsets"),
    "bsr": (lambda w: sf.BSR.from_dense(w, (4, 8)), "row_ptr"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_layer_whose_index_buffer_is_edited_in_place_is_validated_again(fmt):
    """A layer bound once and then edited in place keeps its buffers' addresses: the version counter
    tells the kernel to validate again (it read out of bounds before)."""
    layer = sf.SparseLinear.from_linear(pruned_linear(keep=0.4), format=fmt)
    x = torch.randn(3, 64)
    layer(x)  # validated and bound
    with torch.no_grad():
        getattr(layer, f"weight_{FORMATS[fmt][1]}")[1:] = 10**6
    for rows in (x, torch.randn(40, 64)):  # the bound kernel, and the batched path through the op
        with pytest.raises(ValueError, match="do not make a valid"):
            layer(rows)


def test_an_in_place_edit_that_keeps_the_weight_valid_is_used():
    lin = pruned_linear(keep=0.4)
    layer = sf.SparseLinear.from_linear(lin, format="csr")
    x = torch.randn(2, 64)
    layer(x)
    with torch.no_grad():
        layer.weight_values.mul_(2)
    torch.testing.assert_close(layer(x), F.linear(x, 2 * lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_functional_linear_validates_an_unchecked_weight_on_every_path(fmt):
    make, index = FORMATS[fmt]
    t = make(pruned_linear(keep=0.4).weight.detach()).tensors()
    t[index][1:] = 10**6
    shape = (32, 64)
    params = {"block": (4, 8)} if fmt == "bsr" else {}
    w = type(make(torch.ones(4, 8))).from_tensors(shape, t, validate=False, **params)
    x = torch.randn(3, 64)
    for call in (lambda: sf.ops.linear(x, w), lambda: sf.ops.linear(x, w, backend="batched"),
                 lambda: sf.ops.linear(x, w, backend="reference"),
                 lambda: sf.ops.linear(x.clone().requires_grad_(), w)):
        with pytest.raises(ValueError, match="do not make a valid"):
            call()


def test_functional_act_sparse_validates_an_unchecked_bitmask_on_every_path():
    w_t = pruned_linear(keep=0.4).weight.detach().t().contiguous()
    t = sf.Bitmask.from_dense(w_t).tensors()
    t["row_offsets"][1:] = 10**6
    w = sf.Bitmask.from_tensors(tuple(w_t.shape), t, validate=False)
    x = torch.randn(3, 64)
    for backend in ("", "batched", "reference"):
        with pytest.raises(ValueError, match="do not make a valid"):
            sf.ops.act_sparse_linear(x, w, 0.5, backend=backend)


@pytest.mark.parametrize("backend", ["", "batched", "reference"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_act_sparse_refuses_a_non_finite_weight(backend, rows):
    """An inactive input skips its weight row: inf or NaN there would reach the output on the paths
    that multiply the zeros and not on the one that skips them."""
    w_t = torch.ones(4, 3)
    w_t[0, 1] = float("inf")
    x = torch.ones(rows, 4)
    x[:, 0] = 0  # inactive
    for w in (w_t, sf.Bitmask.from_dense(w_t)):
        with pytest.raises(ValueError, match="finite weight"):
            sf.ops.act_sparse_linear(x, w, 0.5, backend=backend)


def test_act_sparse_weights_edited_in_place_are_checked_again():
    x = torch.randn(3, 8)
    w_t = torch.randn(8, 5)
    sf.ops.act_sparse_linear(x, w_t, 0.5)  # checked once (kept beside the tensor)
    w_t[2, 1] = float("nan")
    with pytest.raises(ValueError, match="finite weight"):
        sf.ops.act_sparse_linear(x, w_t, 0.5)
    layer = sf.ActSparseLinear(torch.randn(5, 8), None, 0.5)
    layer(x)
    with torch.no_grad():
        layer.weight_t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite weight"):
        layer(x)


def test_an_expanded_w_t_gives_the_dense_answer():
    x = torch.randn(2, 5)
    w_t = torch.randn(1, 3).expand(5, 3)  # rows of stride 0: the same row five times
    xs = torch.where(x.abs() > 0.25, x, 0)
    torch.testing.assert_close(sf.ops.act_sparse_linear(x, w_t, 0.25), xs @ w_t)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_calibration_is_refused_before_any_layer_is_replaced(bad):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    calibration = torch.randn(64, 4)
    calibration[5, 1] = bad
    with pytest.raises(ValueError, match="calibration inputs of layer '0' hold inf or NaN"):
        sf.sparsify(model, activation_sparsity=0.5, calibration=[calibration], measure=False, mode_centering=True)
    assert all(type(m) is nn.Linear for m in model)


@pytest.mark.parametrize("target, match", [(1.5, "fraction in"), ({"1": -0.1}, "fraction in"),
                                           ("half", "fraction in")])
def test_bad_activation_sparsity_is_refused_before_any_layer_is_replaced(target, match):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=match):
        sf.sparsify(model, activation_sparsity=target, calibration=[torch.randn(8, 4)], measure=False)
    assert all(type(m) is nn.Linear for m in model)


def test_calibration_without_rows_is_refused():
    with pytest.raises(ValueError, match="no rows of input"):
        sf.sparsify(nn.Sequential(nn.Linear(4, 3)), activation_sparsity=0.5, calibration=[torch.randn(0, 4)],
                    measure=False)


@pytest.mark.parametrize("child", [
    {"class": "LayerNorm", "args": {"shape": [-1], "eps": 1e-5, "affine": True, "bias": True}},  # negative size
    {"class": "Linear", "args": {"in_features": 2**40, "out_features": 2**40, "bias": False}},  # size overflows
])
def test_an_architecture_entry_torch_cannot_build_is_a_value_error(tmp_path, child):
    sf.save(nn.Sequential(nn.ReLU()), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    description = json.loads(header["__metadata__"]["sparseflow"])
    description["architecture"]["children"][0] = child
    header["__metadata__"]["sparseflow"] = json.dumps(description)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ValueError, match="bad .* entry in the architecture"):
        sf.load(tmp_path)


def test_the_functional_ops_checks_compile_without_graph_breaks():
    """The checks that run before the op (kept beside a dense w_t, on a format object) stay out of
    a compiled graph: fullgraph compiles, and gives the eager answer."""
    w_t = torch.randn(64, 32)
    x = torch.randn(3, 64)
    for w in (w_t, sf.Bitmask.from_dense(w_t * (torch.rand(64, 32) > 0.5))):
        compiled = torch.compile(lambda x, w=w: sf.ops.act_sparse_linear(x, w, 0.5) * 2, fullgraph=True)
        torch.testing.assert_close(compiled(x), sf.ops.act_sparse_linear(x, w, 0.5) * 2)


def test_a_layer_the_dict_does_not_target_needs_no_calibration_inputs():
    """activation_sparsity as a dict: calibration inputs are captured for the layers it names only,
    so a head the forward never calls (or one fed inf) stays an untouched dense layer."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.aux_head = nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.up(x)

    model = Model()
    report = sf.sparsify(model, activation_sparsity={"up": 0.5}, calibration=[torch.randn(8, 32)], measure=False)
    assert isinstance(model.up, sf.ActSparseLinear) and type(model.aux_head) is nn.Linear
    assert [r.choice for r in report.layers] == ["act-sparse(dense)", "dense"]
    with pytest.raises(ValueError, match="never reached layer 'aux_head'"):  # asked of it, it is still refused
        sf.sparsify(Model(), activation_sparsity={"aux*": 0.5}, calibration=[torch.randn(8, 32)], measure=False)


@pytest.mark.parametrize("backend", ["", "cpp", "batched", "reference"])
def test_no_input_features_give_the_bias_on_every_backend(backend):
    """K = 0: every row of the output is the bias (x @ w is empty), on every CPU row of the table."""
    x, bias = torch.randn(3, 2, 0), torch.randn(8)
    assert sf.ops.table.rows_of(x) == 6
    y = sf.ops.act_sparse_linear(x, torch.randn(0, 8), 0.3, bias, backend=backend)
    torch.testing.assert_close(y, bias.expand(3, 2, 8))


@pytest.mark.parametrize("backend", ["", "reference"])
def test_a_bias_that_is_no_tensor_is_a_type_error(backend):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    w[:, ::2] = 0
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        sf.ops.linear(x, sf.Bitmask.from_dense(w), [0.0] * 4, backend=backend)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        sf.ops.act_sparse_linear(x, w.t().contiguous(), 0.1, [0.0] * 4, backend=backend)
