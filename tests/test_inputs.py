"""Accepted inputs: dense tensors, nn.Linear, torch.nn.utils.prune and torch.nn.utils.parametrize
(torch.ao.pruning) modules and state dicts, and format strings."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Mask
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize, prune

import sparseflow as sf
from sparseflow.io import compress, dense_weight, parse_format, state_dict_weights


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def test_dense_tensor_and_linear():
    w = torch.randn(4, 6)
    assert torch.equal(dense_weight(w), w)
    lin = nn.Linear(6, 4)
    out = dense_weight(lin)
    assert torch.equal(out, lin.weight) and not out.requires_grad
    assert torch.equal(dense_weight(sf.CSR.from_dense(w)), w)
    assert torch.equal(dense_weight(w.to_sparse()), w)
    with pytest.raises(ValueError, match="2-D"):
        dense_weight(torch.randn(3))
    with pytest.raises(TypeError, match="no weight"):
        dense_weight(nn.ReLU())
    with pytest.raises(TypeError, match="expected a tensor"):
        dense_weight([[1.0]])


def test_torch_prune_live_module_and_state_dict():
    m = model()
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    prune.random_structured(m[0], "weight", amount=0.25, dim=0)  # stacks into one combined mask
    expected = m[0].weight_orig.detach() * m[0].weight_mask
    assert torch.equal(dense_weight(m[0]), expected)
    assert (dense_weight(m[0]) == 0).float().mean() >= 0.5

    sd = m.state_dict()
    assert {"0.weight_orig", "0.weight_mask"} <= set(sd) and "0.weight" not in sd
    folded = state_dict_weights(sd)
    assert list(folded) == ["0.bias", "0.weight", "2.weight", "2.bias"]
    assert torch.equal(folded["0.weight"], expected)
    assert torch.equal(folded["2.weight"], m[2].weight)


def test_prune_mask_is_recomputed_not_stale():
    m = model()
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    with torch.no_grad():
        m[0].weight_mask.fill_(0)  # module.weight is only refreshed by the next forward
    assert (dense_weight(m[0]) == 0).all()


def test_pruned_inf_is_zero_not_nan():
    m = model()
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    prune.custom_from_mask(m[0], "weight", torch.ones(8, 16).index_fill_(1, torch.tensor([0]), 0))
    assert dense_weight(m[0])[0, 0] == 0
    assert state_dict_weights(m.state_dict())["0.weight"][0, 0] == 0


def test_torch_ao_sparsifier():
    m = model()
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(m, config=[{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    assert parametrize.is_parametrized(m[0], "weight")
    live = dense_weight(m[0])
    assert torch.equal(live, m[0].weight)
    assert sf.detect_pattern(live) == "2:4"
    sf.NM.from_dense(live, 2, 4)  # really 2:4

    sd = m.state_dict()
    # torch.ao's FakeSparsity does not save its mask: only the unmasked original is in the state dict.
    assert "0.parametrizations.weight.original" in sd and not any(k.endswith("mask") for k in sd)
    with pytest.warns(UserWarning, match="no mask"):
        unmasked = state_dict_weights(sd)
    assert torch.equal(unmasked["0.weight"], m[0].parametrizations.weight.original)
    masks = {fqn: s["mask"] for fqn, s in sparsifier.state_dict()["state"].items()}
    assert torch.equal(state_dict_weights(sd, masks=masks)["0.weight"], live)

    sparsifier.squash_mask()
    assert torch.equal(state_dict_weights(m.state_dict())["0.weight"], live)


def test_generic_parametrization_with_mask_buffer():
    m = model()
    mask = (torch.rand(8, 16) > 0.5).float()
    parametrize.register_parametrization(m[0], "weight", Mask(mask))
    assert torch.equal(dense_weight(m[0]), m[0].parametrizations.weight.original * mask)
    sd = m.state_dict()
    assert "0.parametrizations.weight.0.mask" in sd
    folded = state_dict_weights(sd)
    assert "0.weight" in folded and not any("parametrizations" in k for k in folded)
    assert torch.equal(folded["0.weight"], dense_weight(m[0]))


def test_unknown_parametrization_state_cannot_be_folded():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, w):
            return w * self.scale

    m = model()
    parametrize.register_parametrization(m[0], "weight", Scale())
    with pytest.raises(ValueError, match="not a mask"):
        state_dict_weights(m.state_dict())
    assert torch.equal(dense_weight(m[0]), m[0].parametrizations.weight.original * 2)


def test_state_dict_errors():
    with pytest.raises(ValueError, match="does not match"):
        state_dict_weights({"a.weight_orig": torch.ones(2, 3), "a.weight_mask": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="which is the weight"):
        both = {"a.weight": torch.ones(2), "a.weight_orig": torch.ones(2), "a.weight_mask": torch.ones(2)}
        state_dict_weights(both)
    with pytest.raises(ValueError, match="not in the state dict"):
        state_dict_weights({"a.weight": torch.ones(2)}, masks={"b.weight": torch.ones(2)})


@pytest.mark.parametrize(
    "spec, cls, params",
    [
        ("bitmask", sf.Bitmask, {}),
        ("CSR", sf.CSR, {}),
        ("bsr", sf.BSR, {}),
        ("block(16, 8)", sf.BSR, {"block": (16, 8)}),
        ("2:4", sf.NM, {"n": 2, "m": 4}),
        ("4:8", sf.NM, {"n": 4, "m": 8}),
        ("nm", sf.NM, {"n": 2, "m": 4}),
    ],
)
def test_parse_format(spec, cls, params):
    assert parse_format(spec) == (cls, params)


def test_compress():
    w = sf.NM.from_dense(torch.randn(8, 32), 2, 4, prune=True).to_dense()
    for spec in ("bitmask", "csr", "bsr", "block(4,4)", "2:4", "4:8"):
        out = compress(w, spec)
        assert torch.equal(out.to_dense(), w), spec
    assert compress(w, "block(4,8)").block == (4, 8)
    assert (compress(w, "4:8").n, compress(w, "4:8").m) == (4, 8)
    lin = nn.Linear(32, 8)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    assert torch.equal(compress(lin, "csr").to_dense(), dense_weight(lin))
    with pytest.raises(ValueError, match="not 1:4 sparse"):
        compress(w, "1:4")
    with pytest.raises(ValueError, match="unknown format 'coo'"):
        compress(w, "coo")
    with pytest.raises(ValueError, match="m in"):
        compress(w, "2:5")
    nm = compress(w, "n:m")  # the n:m the weight has, as SparseLinear.from_linear and sparsify take it
    assert (nm.n, nm.m) == (2, 4) and torch.equal(nm.to_dense(), w)
    with pytest.raises(ValueError, match="format 'n:m' needs an n:m sparse weight"):
        compress(torch.randn(8, 32), "n:m")
    with pytest.raises(ValueError, match="unknown format 'x:y'") as info:
        compress(w, "x:y")
    assert "'n:m'" not in str(info.value)  # the message does not offer a string it refuses


def test_a_pruned_bias_is_taken_as_the_forward_computes_it():
    """torch.nn.utils.prune refreshes `bias` only before a forward: after a load it is stale."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    prune.l1_unstructured(lin, "weight", 0.5)
    prune.l1_unstructured(lin, "bias", 0.5)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    state["bias_orig"] += 1
    lin.load_state_dict(state)  # no forward since: lin.bias is the old one
    x = torch.randn(3, 64)
    modules = [sf.SparseLinear.from_linear(lin, "bitmask"), sf.ActSparseLinear.from_linear(lin, threshold=0.0)]
    for module in modules:  # built before lin's next forward
        torch.testing.assert_close(module(x), lin(x))
    model = nn.Sequential(lin)
    sf.sparsify(model, format="bitmask", measure=False)
    torch.testing.assert_close(model(x), modules[0](x))


def test_torch_pruned_layers_left_dense_save_and_load(tmp_path):
    """sparsify leaves some layers dense; torch's prune hooks (X.weight_orig, X.weight_mask) and
    torch.ao's parametrizations on them made a file sf.load refused."""
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    pruned = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    for layer in (pruned[0], pruned[2]):
        prune.l1_unstructured(layer, "weight", 0.5)
    ao = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(ao, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    for i, model in enumerate((pruned, ao)):
        sf.sparsify(model, include=["0"], format="bitmask", measure=False)
        sf.save(model, tmp_path / str(i))
        back = sf.load(tmp_path / str(i))
        assert type(back[2]) is nn.Linear and (back[2].weight == 0).float().mean() == 0.5  # the pruning kept
        assert torch.equal(back(x), model(x))


def test_torch_sparse_tensors_and_multi_tensor_parametrizations():
    w = torch.randn(8, 16) * (torch.rand(8, 16) < 0.5)
    assert sf.detect_pattern(w.to_sparse()) == sf.detect_pattern(w) == "unstructured"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: sparse CSR support is in beta
        assert sf.detect_pattern(w.to_sparse_csr()) == "unstructured"
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="parametrization of several tensors"):
        state_dict_weights({f"l.{k}": v for k, v in lin.state_dict().items()})
    torch.testing.assert_close(dense_weight(lin), lin.weight.detach())  # the live module evaluates it


def test_fake_sparsity_zeroes_a_non_finite_value_it_prunes_as_the_prune_path_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    mask = model[0].parametrizations.weight[0].mask
    with torch.no_grad():
        model[0].parametrizations.weight.original[~mask.bool()] = float("inf")
    live = dense_weight(model[0])
    assert torch.isfinite(live).all() and (live == 0).float().mean() == 0.5
    folded = state_dict_weights({"0.weight": model[0].parametrizations.weight.original.detach()},
                                {"0.weight": mask})
    assert torch.equal(live, folded["0.weight"])
