"""Checkpoints edited by someone else: every crafted file is refused with a ValueError that names
the problem, before any kernel trusts it; a refused load changes nothing; a failed save leaves the
previous files as they were."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import pruned_linear
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparseflow as sf
from sparseflow import model_io


def saved(tmp_path, module):
    path = tmp_path / "model"
    sf.save(nn.Sequential(module, nn.ReLU()), path)
    return path


def read(path):
    with safe_open(path / model_io.WEIGHTS, "pt") as f:
        return json.loads(f.metadata()["sparseflow"]), {k: f.get_tensor(k) for k in f.keys()}


def write(path, description, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / model_io.WEIGHTS,
              metadata={"sparseflow": json.dumps(description)})


def test_a_saved_buffer_cannot_replace_a_validated_weight_buffer(tmp_path):
    path = saved(tmp_path, sf.SparseLinear.from_linear(pruned_linear(), "bitmask"))
    description, tensors = read(path)
    bad = tensors["0.weight_row_offsets"].clone()
    bad[1:] += 1 << 40  # rows far past the values: a kernel trusting these would read out of bounds
    write(path, description, {**tensors, "__buffers__.0.weight_row_offsets": bad})
    with pytest.raises(ValueError, match="__buffers__.0.weight_row_offsets is not a non-persistent buffer"):
        sf.load(path)
    write(path, description, {**tensors, "__buffers__.9.table": torch.zeros(2)})
    with pytest.raises(ValueError, match="names no module"):
        sf.load(path)


def test_a_saved_non_persistent_buffer_must_fit_the_models(tmp_path):
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = sf.SparseLinear.from_linear(pruned_linear(), "bitmask")
            self.register_buffer("table", torch.arange(4.0), persistent=False)

        def forward(self, x):
            return self.lin(x) + self.table.sum()

    path = tmp_path / "model"
    model = WithTable()
    model.table.mul_(3)  # saved and restored as it is
    sf.save(model, path)
    assert torch.equal(sf.load(path, model=WithTable()).table, model.table)
    description, tensors = read(path)
    write(path, description, {**tensors, "__buffers__.table": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"__buffers__.table has shape \(5,\)"):
        sf.load(path, model=WithTable())


def test_a_refused_act_sparse_load_changes_nothing():
    m = sf.ActSparseLinear.from_linear(pruned_linear(), 0.1, weight_format="bitmask")
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["weight_t_row_offsets"][1:] += 1 << 40
    with pytest.raises(ValueError, match="row_offsets"):
        m.load_state_dict(state)
    assert int(m.weight_t_row_offsets[-1]) == m.weight_t_values.numel()
    with torch.no_grad():
        assert torch.equal(m(x), before)
    dense = sf.ActSparseLinear.from_linear(pruned_linear(), 0.1)
    with pytest.raises(ValueError, match="weight_t must have shape"):
        dense.load_state_dict({**dense.state_dict(), "weight_t": torch.zeros(3, 3)})
    assert dense.weight_t.shape == (64, 32)


@pytest.mark.parametrize("threshold", [-1.0, float("nan")])
def test_act_sparse_thresholds_must_be_non_negative(tmp_path, threshold):
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        sf.ActSparseLinear.from_linear(pruned_linear(), threshold)
    module = sf.ActSparseLinear.from_linear(pruned_linear(), 0.1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):  # an assignment is checked too
        module.threshold = threshold
    assert module.threshold == 0.1
    path = saved(tmp_path, sf.ActSparseLinear.from_linear(pruned_linear(), 0.1))
    description, tensors = read(path)
    description["architecture"]["children"][0]["spec"]["threshold"] = threshold
    write(path, description, tensors)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        sf.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("keep_dense", "false", "keep_dense must be true or false"),  # bool("false") loaded as True
    ("folded_bias", "false", "folded_bias must be true or false"),  # (and dropped the bias on export)
    ("bias", 1, "bias must be true or false"),
    ("threshold", "0.1", "threshold must be a number"),
    ("threshold", 10**400, "int too large"),
    ("shape", [16.7, 32], "shape must be an int"),
    ("shape", [64], "shape must be \\[out_features, in_features\\]"),
])
def test_spec_fields_must_have_their_json_types(tmp_path, field, value, message):
    path = saved(tmp_path, sf.ActSparseLinear.from_linear(pruned_linear(), 0.1, shift=torch.randn(64) * 0.1))
    description, tensors = read(path)
    description["architecture"]["children"][0]["spec"][field] = value
    write(path, description, tensors)
    with pytest.raises(ValueError, match=message):
        sf.load(path)


def test_a_missing_weight_buffer_is_named(tmp_path):
    """Loading into placeholders (sf.load builds them): the buffer the file lacks is named, not a
    placeholder's size in the format's validation."""
    path = saved(tmp_path, sf.SparseLinear.from_linear(pruned_linear(keep=0.1), "csr"))
    description, tensors = read(path)
    del tensors["0.weight_row_ptr"]
    write(path, description, tensors)
    with pytest.raises(ValueError, match="lacks 0.weight_row_ptr"):
        sf.load(path)
    module = sf.SparseLinear.from_linear(pruned_linear(), "bitmask")
    state = module.state_dict()
    state["weight_row_offsets"] = state["weight_row_offsets"].flip(0)
    with pytest.raises(ValueError, match="^layer: bitmask"):  # a format's error names the layer
        nn.ModuleDict({"layer": module}).load_state_dict({f"layer.{k}": v for k, v in state.items()})
    with pytest.raises(TypeError, match="weight_values must be a tensor, got list"):
        module.load_state_dict({**module.state_dict(), "weight_values": [1.0]})


def test_a_bad_embedding_in_the_architecture_is_refused(tmp_path):
    path = tmp_path / "model"
    sf.save(nn.Sequential(nn.Embedding(4, 8), sf.SparseLinear.from_linear(pruned_linear(8, 8), "bitmask")), path)
    description, tensors = read(path)
    description["architecture"]["children"][0]["args"]["padding_idx"] = 10
    write(path, description, tensors)
    with pytest.raises(ValueError, match="bad 'Embedding' entry.*padding_idx|bad 'Sequential' entry.*Padding_idx"):
        sf.load(path)


def test_strict_loading_reports_keys_a_sparse_module_does_not_hold():
    for m in (sf.SparseLinear.from_linear(pruned_linear(), "bitmask"),
              sf.ActSparseLinear.from_linear(pruned_linear(), 0.1)):
        with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
            m.load_state_dict({**m.state_dict(), "extra": torch.zeros(1)})
        m.load_state_dict({**m.state_dict(), "extra": torch.zeros(1)}, strict=False)


def test_building_blocks_are_not_allocated_before_the_file_is_read(tmp_path):
    """A 2 KB file declaring a 65536 x 65536 nn.Linear: the model is built on the meta device, so
    loading fails on the missing tensor instead of allocating 16 GiB first (the subprocess has 3 GiB
    of address space)."""
    path = saved(tmp_path, sf.SparseLinear.from_linear(pruned_linear(), "bitmask"))
    description, tensors = read(path)
    description["architecture"]["children"][1] = {"class": "Linear", "args": {
        "in_features": 65536, "out_features": 65536, "bias": False, "dtype": "torch.float32"}}
    write(path, description, tensors)
    code = ("import resource, sparseflow as sf\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "try:\n"
            f"    sf.load({str(path)!r})\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "refused: model.safetensors does not fit the model" in out.stdout, out.stderr
    assert "1.weight" in out.stdout


def test_values_in_the_padding_past_the_matrix_are_refused():
    """Kernels multiply padding by x's zero padding, so an inf there would make NaN: refused."""
    torch.manual_seed(0)
    w = torch.randn(30, 60)
    w[:, 16:32] = 0
    b = sf.BSR.from_dense(w, block=(16, 16))
    rows_pad = b.values.clone()
    rows_pad[-1, 15, 0] = float("inf")  # row 31 of the last block row: past row 29
    with pytest.raises(ValueError, match="past row 29"):
        sf.BSR.from_tensors(b.shape, {**b.tensors(), "values": rows_pad}, block=(16, 16))
    cols_pad = b.values.clone()
    cols_pad[b.col_indices == 3, 0, 15] = float("inf")  # column 63 of the last block column: past 59
    with pytest.raises(ValueError, match="past column 59"):
        sf.BSR.from_tensors(b.shape, {**b.tensors(), "values": cols_pad}, block=(16, 16))
    sf.BSR.from_tensors(b.shape, b.tensors(), block=(16, 16))  # the untouched one is valid

    w2 = torch.nn.functional.pad(torch.randn(4, 62), (0, 2)).view(4, 16, 4)
    w2 = (w2 * torch.tensor([1.0, 1.0, 0.0, 0.0])).view(4, 64)[:, :62]
    nm = sf.NM.from_dense(w2, 2, 4)
    index, values = nm.index.clone(), nm.values.clone()
    index[:, -1] = (index[:, -1] & 0x0F) | (2 << 4) | (3 << 6)  # last group: positions 2, 3 = columns 62, 63
    values[:, -2:] = float("inf")
    with pytest.raises(ValueError, match="past column 61"):
        sf.NM.from_tensors(nm.shape, {"values": values, "index": index}, n=2, m=4)
    values[:, -2:] = 0  # zeros there are what from_dense writes for padding
    sf.NM.from_tensors(nm.shape, {"values": values, "index": index}, n=2, m=4)


def test_deeply_nested_descriptions_are_refused(tmp_path):
    path = saved(tmp_path, sf.SparseLinear.from_linear(pruned_linear(), "bitmask"))
    _, tensors = read(path)
    save_file(tensors, path / model_io.WEIGHTS, metadata={"sparseflow": "[" * 100000 + "]" * 100000})
    with pytest.raises(ValueError, match="damaged sparseflow description"):
        sf.load(path)


def tiny_llama(act="silu"):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, hidden_act=act)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="unstructured", progress=False)
    sf.sparsify(model, format="bitmask", measure=False)
    return model


@pytest.mark.parametrize("save", ["save_pretrained", "export_dense"])
def test_a_failed_save_pretrained_leaves_the_previous_files(tmp_path, monkeypatch, save):
    directory = tmp_path / "model"
    getattr(model_io, save)(tiny_llama("silu"), directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        getattr(model_io, save)(tiny_llama("relu"), directory)  # another config, written first
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


@pytest.mark.parametrize("name, message", [("set_seed", "'set_seed' is no transformers model class"),
                                           (["LlamaForCausalLM"], "is no transformers model class"),
                                           ("BertModel", "BertModel does not fit its config.json")])
def test_from_pretrained_builds_only_a_model_class_that_fits_the_config(tmp_path, name, message):
    path = tmp_path / "model"
    sf.save_pretrained(tiny_llama(), path)
    description, tensors = read(path)
    description["transformers_class"] = name  # (it called any callable of transformers with the config)
    write(path, description, tensors)
    with pytest.raises(ValueError, match=message):
        sf.from_pretrained(path)


@pytest.mark.parametrize("size", [-5, 2**62])
def test_from_pretrained_refuses_a_recorded_structure_torch_cannot_build(tmp_path, size):
    path = tmp_path / "model"
    sf.save_pretrained(tiny_llama(), path)
    config = json.loads((path / "config.json").read_text())
    config["sparseflow_structure"] = {"mlp": {"model.layers.0.mlp.down_proj": size}}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bad sparseflow_structure"):  # (was torch's RuntimeError)
        sf.from_pretrained(path)


def test_serve_tells_a_sparse_model_by_its_weights_not_by_sparseflow_json(tmp_path):
    from sparseflow.serve.loader import _saved_by_sparseflow

    model = tiny_llama()
    sf.save_pretrained(model, tmp_path / "sparse")
    os.remove(tmp_path / "sparse" / model_io.DESCRIPTION)
    assert _saved_by_sparseflow(tmp_path / "sparse")
    sf.export_dense(model, tmp_path / "dense")
    (tmp_path / "dense" / model_io.DESCRIPTION).write_text("{}")  # a stale description does not count
    assert not _saved_by_sparseflow(tmp_path / "dense")
