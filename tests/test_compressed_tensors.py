"""Legacy compressed-tensors checkpoints: our reader and writer against each other and, when the
compressed-tensors package is installed, against the library itself in both directions."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparseflow as sf
from sparseflow.io import compress, read_compressed_tensors, write_compressed_tensors

FORMATS = ["sparse-bitmask", "sparse-24-bitmask"]


def pruned(rows, cols, pattern, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if pattern == "2:4":
        w = sf.NM.from_dense(w, 2, 4, prune=True).to_dense()
        w[0, :4] = torch.tensor([0.0, 1.5, 0.0, 0.0])  # a group with one non-zero: a kept value is zero
    else:
        w[torch.rand(rows, cols, generator=g) > 0.35] = 0
    return w.to(dtype)


def weights_for(fmt, dtype=torch.float32):
    if fmt == "sparse-bitmask":
        return {
            "model.fc1.weight": sf.Bitmask.from_dense(pruned(16, 44, "unstructured", 1, dtype)),
            "model.fc2.weight": sf.CSR.from_dense(pruned(8, 16, "unstructured", 2, dtype)),  # converted
            "model.fc1.bias": torch.randn(16).to(dtype),
        }
    return {
        "model.fc1.weight": sf.NM.from_dense(pruned(16, 44, "2:4", 1, dtype), 2, 4),
        "model.fc2.weight": sf.Bitmask.from_dense(pruned(8, 16, "2:4", 2, dtype)),  # 2:4 zeros, other format
        "model.fc1.bias": torch.randn(16).to(dtype),
    }


def dense(obj):
    return obj if isinstance(obj, torch.Tensor) else obj.to_dense()


# ---------------------------------------------------------------- ours -> ours


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(tmp_path, fmt, dtype):
    weights = weights_for(fmt, dtype)
    write_compressed_tensors(weights, tmp_path, fmt)
    back = read_compressed_tensors(tmp_path)
    assert set(back) == set(weights)
    expected_type = sf.Bitmask if fmt == "sparse-bitmask" else sf.NM
    for name, obj in weights.items():
        if name.endswith(".weight"):
            assert type(back[name]) is expected_type
        assert back[name].dtype == dtype
        assert torch.equal(dense(back[name]), dense(obj)), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_layout_on_disk(tmp_path, fmt):
    weights = weights_for(fmt)
    write_compressed_tensors(weights, tmp_path, fmt, config={"model_type": "llama", "hidden_size": 16})
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.fc1.weight" not in stored
    w = dense(weights["model.fc1.weight"])
    bits = stored["model.fc1.bitmask"]
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (16, 6)
    # numpy.packbits(..., bitorder="little") of the kept mask, row by row
    import numpy as np

    if fmt == "sparse-bitmask":
        kept = w != 0
        assert torch.equal(stored["model.fc1.shape"], torch.tensor([16, 44]))
        assert torch.equal(stored["model.fc1.compressed"], w[kept])
        counts = kept.sum(1)
        assert torch.equal(stored["model.fc1.row_offsets"], torch.cumsum(counts, 0) - counts)
    else:
        nm = weights["model.fc1.weight"]
        kept = torch.zeros(16, 11, 4, dtype=torch.bool)
        kept.scatter_(-1, nm.positions().view(16, 11, 2).long(), True)
        kept = kept.view(16, 44)
        assert torch.equal(stored["model.fc1.shape"], torch.tensor([[16], [44]]))
        assert tuple(stored["model.fc1.compressed"].shape) == (16, 22)
        assert stored["model.fc1.compressed"][0, 0] == 0  # the kept zero of the one-non-zero group
        assert "model.fc1.row_offsets" not in stored
    assert np.array_equal(bits.numpy(), np.packbits(kept.numpy(), axis=-1, bitorder="little"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 16
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"]["format"] == fmt
    assert qc["sparsity_config"]["targets"] == ["model.fc1", "model.fc2"]


def test_single_file_without_config_infers_format(tmp_path):
    for fmt in FORMATS:
        write_compressed_tensors(weights_for(fmt), tmp_path / fmt, fmt)
        os.remove(tmp_path / fmt / "config.json")
        back = read_compressed_tensors(tmp_path / fmt / "model.safetensors")
        assert type(back["model.fc1.weight"]) is (sf.Bitmask if fmt == "sparse-bitmask" else sf.NM)


def test_single_file_without_config_names_a_missing_row_offsets(tmp_path):
    write_compressed_tensors(weights_for("sparse-bitmask"), tmp_path, "sparse-bitmask")
    os.remove(tmp_path / "config.json")
    stored = load_file(tmp_path / "model.safetensors")
    del stored["model.fc1.row_offsets"]  # flat values still say sparse-bitmask
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="sparse-bitmask weight 'model.fc1' lacks \\['model.fc1.row_offsets'\\]"):
        read_compressed_tensors(tmp_path / "model.safetensors")


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    write_compressed_tensors(weights_for("sparse-24-bitmask"), tmp_path, "sparse-24-bitmask")
    before = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "config.json")}
    with pytest.raises(TypeError, match="config cannot be written as JSON"):
        write_compressed_tensors(weights_for("sparse-bitmask"), tmp_path, config={"odd": object()})
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no temporary left
    write_compressed_tensors(weights_for("sparse-bitmask"), tmp_path, config={"torch_dtype": torch.float16})
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"  # as transformers writes it
    assert type(read_compressed_tensors(tmp_path)["model.fc1.weight"]) is sf.Bitmask


def test_sharded_index(tmp_path):
    write_compressed_tensors(weights_for("sparse-bitmask"), tmp_path, "sparse-bitmask")
    stored = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(stored)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: stored[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    back = read_compressed_tensors(tmp_path)
    expected = weights_for("sparse-bitmask")["model.fc1.weight"].to_dense()
    assert torch.equal(back["model.fc1.weight"].to_dense(), expected)
    index["weight_map"]["model.fc1.bias"] = "../evil.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name"):
        read_compressed_tensors(tmp_path)


def test_write_rejects(tmp_path):
    not_24 = sf.Bitmask.from_dense(pruned(8, 16, "unstructured"))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        write_compressed_tensors({"fc.weight": not_24}, tmp_path, "sparse-24-bitmask")
    odd = sf.NM.from_dense(pruned(8, 18, "2:4"), 2, 4, prune=True)
    with pytest.raises(ValueError, match="in_features % 4 == 0"):
        write_compressed_tensors({"fc.weight": odd}, tmp_path, "sparse-24-bitmask")
    with pytest.raises(ValueError, match="<module>.weight"):
        write_compressed_tensors({"fc": not_24}, tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        write_compressed_tensors({}, tmp_path, "marlin-24")
    with pytest.raises(ValueError, match="written twice"):
        write_compressed_tensors({"fc.weight": not_24, "fc.bitmask": torch.zeros(1)}, tmp_path)
    assert not os.path.exists(tmp_path / "model.safetensors")


# ---------------------------------------------------------------- crafted files


def write_raw(tmp_path, fmt, tensors, config=True):
    save_file(tensors, tmp_path / "model.safetensors")
    if config:
        cfg = {"quantization_config": {"sparsity_config": {"format": fmt}}}
        (tmp_path / "config.json").write_text(json.dumps(cfg))


def valid_tensors(tmp_path, fmt):
    write_compressed_tensors(weights_for(fmt), tmp_path, fmt)
    return load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "fmt, key, make, message",
    [
        ("sparse-bitmask", "model.fc1.row_offsets", lambda t: t.flip(0).contiguous(), "row_offsets|row 0"),
        ("sparse-bitmask", "model.fc1.row_offsets", lambda t: t[:-1].clone(), "must be int64 \\(16,\\)"),
        ("sparse-bitmask", "model.fc1.bitmask", lambda t: torch.cat([t[:, :-1].clone().fill_(255), t[:, -1:]], 1),
         "mask bits|row"),
        ("sparse-bitmask", "model.fc1.bitmask", lambda t: t.to(torch.int8), "bitmask must be uint8"),
        ("sparse-bitmask", "model.fc1.compressed", lambda t: t[:-3].clone(), "values|row_offsets"),
        ("sparse-bitmask", "model.fc1.compressed", lambda t: t.to(torch.int8), "quantized"),
        ("sparse-bitmask", "model.fc1.shape", lambda t: torch.tensor([16, -44]), "both sides"),
        ("sparse-bitmask", "model.fc1.shape", lambda t: torch.tensor([16.0, 44.0]), "2 integers"),
        ("sparse-bitmask", "model.fc1.shape", lambda t: torch.tensor([16, 44, 1]), "2 integers"),
        ("sparse-24-bitmask", "model.fc1.bitmask", lambda t: torch.cat([t[:, :-1].clone().fill_(0xFF), t[:, -1:]], 1),
         "keeps 4 values, not 2"),
        # in_features 44: the last byte's top 4 bits are padding (they were ignored for 2:4)
        *((f, "model.fc1.bitmask", lambda t: torch.cat([t[:, :-1], t[:, -1:] | 0x80], 1), "past in_features \\(44\\)")
          for f in ("sparse-24-bitmask", "sparse-bitmask")),
        ("sparse-24-bitmask", "model.fc1.bitmask", lambda t: t.clone().fill_(0x01), "keeps 1 values, not 2"),
        ("sparse-24-bitmask", "model.fc1.compressed", lambda t: t[:, :-1].contiguous(), "must have"),
        ("sparse-24-bitmask", "model.fc1.shape", lambda t: torch.tensor([[16], [42]]), "not a multiple of 4"),
    ],
)
def test_crafted_tensors_raise(tmp_path, fmt, key, make, message):
    tensors = valid_tensors(tmp_path, fmt)
    tensors[key] = make(tensors[key])
    write_raw(tmp_path, fmt, tensors, config=False)
    with pytest.raises(ValueError, match=message):
        read_compressed_tensors(tmp_path)


def test_missing_param_and_bad_config(tmp_path):
    tensors = valid_tensors(tmp_path, "sparse-bitmask")
    del tensors["model.fc1.bitmask"]
    write_raw(tmp_path, "sparse-bitmask", tensors)
    with pytest.raises(ValueError, match="lacks \\['model.fc1.bitmask'\\]"):
        read_compressed_tensors(tmp_path)
    for fmt in ("x", ["sparse-bitmask"], {"a": 1}):
        bad = {"quantization_config": {"sparsity_config": {"format": fmt}}}
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="sparsity format .* is not supported"):
            read_compressed_tensors(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_compressed_tensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 20)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_compressed_tensors(tmp_path)


def test_dense_config_passes_everything_through(tmp_path):
    write_raw(tmp_path, "dense", {"fc.weight": torch.ones(2, 2)})
    assert set(read_compressed_tensors(tmp_path)) == {"fc.weight"}


def test_fuzz_tensors_never_crash(tmp_path):
    import random

    rng = random.Random(7)
    for fmt in FORMATS:
        base = valid_tensors(tmp_path, fmt)
        keys = [k for k in base if not k.endswith(".bias")]
        for _ in range(150):
            tensors = {k: v.clone() for k, v in base.items()}
            key = rng.choice(keys)
            flat = tensors[key].view(-1)
            info = torch.iinfo(flat.dtype) if not flat.dtype.is_floating_point else None
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(flat.numel())
                if info is None:
                    flat[i] = rng.uniform(-3, 3)
                else:
                    flat[i] = rng.randint(max(info.min, -100), min(info.max, 300))
            write_raw(tmp_path, fmt, tensors)
            try:
                out = read_compressed_tensors(tmp_path)
            except ValueError:
                continue
            for obj in out.values():
                if isinstance(obj, sf.SparseFormat):
                    x = torch.randn(2, obj.shape[1])
                    torch.testing.assert_close(sf.ops.linear(x, obj), x @ obj.to_dense().T)


# ---------------------------------------------------------------- against the library

def _library():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import SparsityCompressionConfig
    except Exception as e:  # not installed, or incompatible with this transformers
        pytest.skip(f"compressed-tensors not importable: {e}")
    return ModelCompressor, SparsityCompressionConfig


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(44, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_library_decompresses_what_we_write(tmp_path, fmt):
    ModelCompressor, _ = _library()
    pattern = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    weights = {
        "0.weight": compress(pruned(16, 44, pattern, 3), "2:4" if pattern == "2:4" else "bitmask"),
        "2.weight": compress(pruned(8, 16, pattern, 4), "csr"),
        "0.bias": torch.randn(16),
        "2.bias": torch.randn(8),
    }
    write_compressed_tensors(weights, tmp_path, fmt, config={"model_type": "custom"})
    config = json.loads((tmp_path / "config.json").read_text())
    compressor = ModelCompressor.from_compression_config(config["quantization_config"])
    assert compressor.sparsity_config.format == fmt
    model = tiny_model()
    compressor.decompress(str(tmp_path), model)
    state = model.state_dict()
    for name, obj in weights.items():
        assert torch.equal(state[name], dense(obj)), name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_we_read_what_the_library_writes(tmp_path, fmt):
    ModelCompressor, SparsityCompressionConfig = _library()
    model = tiny_model()
    pattern = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    with torch.no_grad():
        model[0].weight.copy_(pruned(16, 44, pattern, 5))
        model[2].weight.copy_(pruned(8, 16, pattern, 6))
    config = SparsityCompressionConfig.load_from_registry(fmt, targets=["Linear"])
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=config)
    compressed = compressor.compress(model)
    assert "0.compressed" in compressed and "0.weight" not in compressed
    save_file({k: v.contiguous() for k, v in compressed.items()}, tmp_path / "model.safetensors")
    compressor.update_config(str(tmp_path))
    back = read_compressed_tensors(tmp_path)
    assert type(back["0.weight"]) is (sf.NM if pattern == "2:4" else sf.Bitmask)
    for name, t in model.state_dict().items():
        assert torch.equal(dense(back[name]), t), name


@pytest.mark.parametrize("fmt", ["bitmask", "2:4", "Sparse-Bitmask"])
def test_export_refuses_an_unknown_format_by_name(tmp_path, fmt):
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(8, 16) > 0.5)
    model = nn.Sequential(sf.SparseLinear.from_linear(lin, format="bitmask"))
    with pytest.raises(ValueError, match="format must be one of"):
        sf.export_compressed_tensors(model, tmp_path / "out", fmt)
