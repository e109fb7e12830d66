"""sparseflow's own checkpoint: round trips, validation of crafted files, atomic save, and a fuzz
loop that runs in-process (a segfault in validation would kill pytest, which is the point)."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseflow as sf
from sparseflow.formats._bits import pack_fields
from sparseflow.io import _safetensors as st_io
from sparseflow.io import load_metadata, load_weights, save_weights

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sparse_weight(rows=12, cols=40, density=0.3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) > density] = 0
    return w.to(dtype)


def all_formats(w):
    return {
        "fc.bitmask": sf.Bitmask.from_dense(w),
        "fc.csr": sf.CSR.from_dense(w),
        "fc.bsr": sf.BSR.from_dense(w, block=(4, 8)),
        "fc.nm": sf.NM.from_dense(w, n=2, m=4, prune=True),
        "fc.nm48": sf.NM.from_dense(w, n=3, m=8, prune=True),
    }


def dense(obj):
    return obj if isinstance(obj, torch.Tensor) else obj.to_dense()


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, sf.SparseFormat):
        assert a.params() == b.params() and tuple(a.shape) == tuple(b.shape)
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name]), name
    assert torch.equal(dense(a), dense(b))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_format(tmp_path, dtype):
    w = sparse_weight(dtype=dtype)
    weights = {**all_formats(w), "fc.bias": torch.randn(12).to(dtype), "step": torch.tensor(3),
               "flags": torch.tensor([True, False])}
    path = tmp_path / "w.safetensors"
    save_weights(weights, path, metadata={"arch": "mlp", "layers": [1, 2]})
    loaded = load_weights(path)
    assert list(loaded) == list(weights)
    for name in weights:
        assert_same(weights[name], loaded[name])
    assert load_metadata(path) == {"arch": "mlp", "layers": [1, 2]}


def test_loaded_formats_run(tmp_path):
    w = sparse_weight()
    save_weights(all_formats(w), tmp_path / "w.safetensors")
    x = torch.randn(3, 40)
    for name, fmt in load_weights(tmp_path / "w.safetensors").items():
        torch.testing.assert_close(sf.ops.linear(x, fmt), x @ fmt.to_dense().T, msg=name)


def test_header_is_json_in_safetensors_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": sf.BSR.from_dense(sparse_weight(), block=(4, 8)), "b": torch.zeros(2)}, path)
    header = json.loads(st_io.read_safetensors_metadata(path)["sparseflow"])
    assert header["library_version"] == sf.__version__
    assert header["entries"]["a"] == {"format": "bsr", "shape": [12, 40], "dtype": "float32",
                                      "params": {"block": [4, 8]}}
    assert header["entries"]["b"]["format"] == "tensor"
    _, tensors = st_io.read_safetensors(path)
    assert set(tensors) == {"a.values", "a.col_indices", "a.row_ptr", "b"}


def test_shared_and_sliced_tensors_are_saved(tmp_path):
    base = torch.randn(4, 6)
    save_weights({"a": base[1:3], "b": base[1:3], "c": base.T}, tmp_path / "w.safetensors")
    out = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(out["a"], base[1:3]) and torch.equal(out["c"], base.T)


def test_save_rejects_bad_inputs(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(TypeError, match="expected a sparseflow format"):
        save_weights({"a": [1, 2]}, path)
    with pytest.raises(ValueError, match="produced twice"):
        save_weights({"a": sf.CSR.from_dense(sparse_weight()), "a.values": torch.zeros(1)}, path)
    with pytest.raises(TypeError, match="JSON"):
        save_weights({"a": torch.zeros(1)}, path, metadata={"x": object()})
    with pytest.raises(TypeError, match="sparse_coo"):
        save_weights({"a": torch.eye(3).to_sparse()}, path)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- atomic save


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st_io, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_weights({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(3)}, path)

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        save_weights({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert torch.equal(load_weights(path)["a"], torch.ones(3))


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(3)}, path)
    save_weights({"b": torch.zeros(2)}, path)
    assert list(load_weights(path)) == ["b"]
    assert os.listdir(tmp_path) == ["w.safetensors"]


# ---------------------------------------------------------------- crafted files


def read_raw(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path, header, body):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)


def edit_entries(path, edit):
    """Rewrites the sparseflow JSON of a file with edit(entries) applied, tensors unchanged."""
    header, body = read_raw(path)
    meta = json.loads(header["__metadata__"]["sparseflow"])
    edit(meta["entries"])
    header["__metadata__"]["sparseflow"] = json.dumps(meta)
    write_raw(path, header, body)


def replace_tensor(path, name, tensor):
    """Re-saves the file with one tensor swapped (the header JSON is kept as it was)."""
    metadata, tensors = st_io.read_safetensors(path)
    tensors[name] = tensor
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({**all_formats(sparse_weight()), "bias": torch.randn(12)}, path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e["fc.csr"].update(format="coo"), "unknown format 'coo'"),
        (lambda e: e["fc.csr"].update(shape=[12]), "shape of 2 positive ints"),
        (lambda e: e["fc.csr"].update(shape=[12, 0]), "shape of 2 positive ints"),
        (lambda e: e["fc.csr"].update(shape=[12, "40"]), "shape must be a list of ints"),
        (lambda e: e["fc.csr"].update(shape=[12.0, 40]), "shape must be a list of ints"),
        (lambda e: e["fc.csr"].update(shape=[True, 40]), "shape must be a list of ints"),
        (lambda e: e["fc.csr"].update(shape=[13, 40]), "row_ptr must be int64 \\(14,\\)"),
        (lambda e: e["fc.csr"].update(dtype="float64"), "dtype 'float64' is not one of"),
        (lambda e: e["fc.csr"].update(dtype="float16"), "values are torch.float32, the header says"),
        (lambda e: e["bias"].update(dtype="int64"), "header says torch.int64"),
        (lambda e: e["bias"].update(shape=[3, 4]), "header says"),
        (lambda e: e["fc.bsr"].update(params={}), "needs params \\['block'\\]"),
        (lambda e: e["fc.bsr"].update(params={"block": [3, 8]}), "powers of two"),
        (lambda e: e["fc.bsr"].update(params={"block": "ab"}), "parameter 'block' must be"),
        (lambda e: e["fc.nm"].update(params={"n": 2, "m": 5}), "m in"),
        (lambda e: e["fc.nm"].update(params={"n": 2.5, "m": 4}), "parameter 'n' must be"),
        (lambda e: e["fc.nm"].update(params={"n": 1, "m": 4}), "values must be float"),
        (lambda e: e.pop("bias"), "not described by the header: \\['bias'\\]"),
        (lambda e: e.update(extra={"format": "tensor", "shape": [1], "dtype": "float32"}), "missing tensors"),
        (lambda e: e.update({"fc": {"format": "tensor", "shape": [1], "dtype": "float32"}}), "missing"),
        (lambda e: e.update({"fc.csr.values": e["bias"]}), "claimed by both"),
        (lambda e: e.__setitem__("bias", [1]), "entry must be a JSON object"),
    ],
)
def test_crafted_header_raises(ckpt, edit, message):
    edit_entries(ckpt, edit)
    with pytest.raises(ValueError, match=message):
        load_weights(ckpt)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("fc.csr.row_ptr", lambda t: t.clone().index_fill_(0, torch.tensor([5]), 10**6), "row_ptr"),
        ("fc.csr.row_ptr", lambda t: t.clone().index_fill_(0, torch.tensor([0]), -1), "row_ptr\\[0\\]"),
        ("fc.csr.col_indices", lambda t: t.clone().fill_(45), "outside \\[0, 40\\)"),
        ("fc.csr.col_indices", lambda t: t.to(torch.int64), "col_indices must be int16/int32"),
        ("fc.bitmask.row_offsets", lambda t: t.clone().index_fill_(0, torch.tensor([3]), 2), "row_offsets"),
        ("fc.bitmask.row_offsets", lambda t: t.to(torch.int32), "row_offsets must be int64"),
        ("fc.bitmask.mask", lambda t: t.clone().fill_(255), "mask bits|row_offsets"),
        ("fc.bitmask.mask", lambda t: t.to(torch.float32), "must be an integer tensor"),
        ("fc.bitmask.values", lambda t: t[:-1].clone(), "values"),
        ("fc.bsr.col_indices", lambda t: t.clone().fill_(-7), "block column -7"),
        ("fc.bsr.row_ptr", lambda t: t.flip(0).contiguous(), "row_ptr"),
        ("fc.nm.index", lambda t: t.clone().fill_(0), "not strictly increasing"),
        ("fc.nm.index", lambda t: t[:, :-1].contiguous(), "index must be uint8"),
        # m = 8 keeps 4-bit positions: 9 is strictly increasing after 5, 6 but past the group
        ("fc.nm48.index", lambda t: pack_fields(torch.tensor([5, 6, 9]).repeat(12, 5).to(torch.uint8), 4),
         "not below m=8"),
    ],
)
def test_crafted_tensor_raises(ckpt, name, make, message):
    _, tensors = st_io.read_safetensors(ckpt)
    replace_tensor(ckpt, name, make(tensors[name]))
    with pytest.raises(ValueError, match=message):
        load_weights(ckpt)


def test_not_a_checkpoint(tmp_path, ckpt):
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a sparseflow checkpoint"):
        load_weights(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(garbage)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


def test_newer_format_version_and_bad_json(ckpt):
    header, body = read_raw(ckpt)
    meta = json.loads(header["__metadata__"]["sparseflow"])
    meta["format_version"] = 99
    header["__metadata__"]["sparseflow"] = json.dumps(meta)
    write_raw(ckpt, header, body)
    with pytest.raises(ValueError, match="newer sparseflow"):
        load_weights(ckpt)
    header["__metadata__"]["sparseflow"] = "[" * 100000
    write_raw(ckpt, header, body)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_weights(ckpt)


def test_truncated_file(ckpt):
    data = ckpt.read_bytes()
    for size in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        ckpt.write_bytes(data[:size])
        with pytest.raises(ValueError):
            load_weights(ckpt)


# ---------------------------------------------------------------- fuzz


def check_loaded(weights):
    """What a successful load must give: formats whose dense form and kernels work."""
    for obj in weights.values():
        if isinstance(obj, sf.SparseFormat):
            d = obj.to_dense()
            assert tuple(d.shape) == tuple(obj.shape)
            x = torch.randn(2, obj.shape[1], dtype=obj.dtype)
            assert sf.ops.linear(x, obj).shape == (2, obj.shape[0])


def try_load(path):
    try:
        weights = load_weights(path)
    except ValueError:
        return False
    check_loaded(weights)
    return True


def mutate_bytes(rng, data, header_len):
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bytes anywhere
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # flip bytes in the tensor data only, so safetensors accepts the file
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(8 + header_len, len(data))] = rng.randrange(256)
    elif kind == 2:  # truncate
        data = data[: rng.randrange(len(data))]
    elif kind == 3:  # header length lies
        n = rng.choice([0, 1, header_len - 1, header_len + 1, len(data), 2**63, rng.randrange(2**64)])
        data[:8] = struct.pack("<Q", n)
    else:  # flip a byte inside the JSON header
        pos = rng.randrange(8, 8 + header_len)
        data[pos] = rng.choice(b'0123456789[]{},:"-. ex')
    return bytes(data)


def mutate_tensors(rng, path, tensors, metadata):
    """Structurally valid safetensors with one index/metadata buffer tampered."""
    name = rng.choice([k for k in tensors if not k.endswith(".values") and k != "bias"])
    t = tensors[name].clone()
    kind = rng.randrange(4)
    if kind == 0 and t.numel():
        flat = t.view(-1)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(flat.numel())
            info = torch.iinfo(t.dtype)
            near = int(flat[i]) + rng.choice([-1, 1])
            value = rng.choice([-1, 0, 1, 255, 2**15 - 1, near, 10**6, info.max])
            flat[i] = min(max(value, info.min), info.max)
    elif kind == 1:
        t = t.to(rng.choice([torch.int16, torch.int32, torch.int64, torch.uint8, torch.float32]))
    elif kind == 2:
        t = t.reshape(-1)[: max(0, t.numel() - rng.randint(1, 3))].clone()
    else:
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:2]])
    tensors = {**tensors, name: t.contiguous()}
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def mutate_entries(rng, entries):
    name = rng.choice(list(entries))
    entry = entries[name]
    key = rng.choice(["format", "shape", "dtype", "params", None])
    if key is None:
        del entries[name]
    elif key == "format":
        entry["format"] = rng.choice(["bitmask", "csr", "bsr", "nm", "tensor", "x", 3, None])
    elif key == "shape":
        entry["shape"] = rng.choice(
            [[s + rng.choice([-1, 1, 7]) for s in entry["shape"]], [], [1, 1, 1], [0, 40], [-5, 40],
             [12, 2**40], "12x40", [[12], 40]]
        )
    elif key == "dtype":
        entry["dtype"] = rng.choice(["float32", "float16", "bfloat16", "int64", "complex64", "", 1])
    else:
        entry["params"] = rng.choice(
            [{}, {"block": [8, 8]}, {"block": [4, 8, 1]}, {"block": [0, 4]}, {"n": 2, "m": 4},
             {"n": 3, "m": 8}, {"n": 4, "m": 4}, {"n": True, "m": 4}, {"n": 2, "m": 4, "x": 1}, [], None]
        )


def test_fuzz_never_crashes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({**all_formats(sparse_weight(rows=9, cols=37)), "bias": torch.randn(9)}, path)
    original = path.read_bytes()
    (header_len,) = struct.unpack("<Q", original[:8])
    metadata, tensors = st_io.read_safetensors(path)
    rng = random.Random(1234)
    outcomes = {True: 0, False: 0}
    for i in range(1200):
        kind = i % 3
        if kind == 0:
            path.write_bytes(mutate_bytes(rng, original, header_len))
        elif kind == 1:
            mutate_tensors(rng, path, tensors, metadata)
        else:
            meta = json.loads(metadata["sparseflow"])
            mutate_entries(rng, meta["entries"])
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"sparseflow": json.dumps(meta)})
        outcomes[try_load(path)] += 1
    # Most mutations must be caught, and some (e.g. a flipped float value) must still load.
    assert outcomes[False] > 600 and outcomes[True] > 20, outcomes


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_index_buffers_hypothesis(tmp_path_factory, data):
    w = sparse_weight(rows=5, cols=19)
    fmt = data.draw(st.sampled_from(["bitmask", "csr", "bsr", "nm"]))
    obj = {"bitmask": sf.Bitmask.from_dense(w), "csr": sf.CSR.from_dense(w),
           "bsr": sf.BSR.from_dense(w, block=(2, 4)), "nm": sf.NM.from_dense(w, 2, 4, prune=True)}[fmt]
    path = tmp_path_factory.mktemp("h") / "w.safetensors"
    save_weights({"w": obj}, path)
    metadata, tensors = st_io.read_safetensors(path)
    name = data.draw(st.sampled_from([f"w.{b}" for b in obj.tensor_names if b != "values"]))
    flat = tensors[name].view(-1)
    lo, hi = (0, 255) if flat.dtype == torch.uint8 else (-(2**15), 2**15 - 1)
    for _ in range(data.draw(st.integers(1, 4))):
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.integers(lo, hi))
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    try_load(path)


def test_result_files_are_replaced_whole(tmp_path, monkeypatch):
    """Benchmark and demo results (write_result, save_figure) make their folder and replace the
    file atomically: a write that fails leaves the previous result readable, and no temp file."""
    import os

    from sparseflow.io._atomic import write_result

    path = tmp_path / "results" / "r.json"
    write_result(path, '{"old": 1}')
    assert path.read_text() == '{"old": 1}'

    def broken(src, dst):
        raise OSError(27, "File too large")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="too large"):
        write_result(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_figures_are_saved_as_savefig_names_them(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseflow.io._atomic import save_figure

    fig = plt.figure()
    assert save_figure(fig, tmp_path / "plot") == tmp_path / "plot.png"  # no suffix: the default format added
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert save_figure(fig, tmp_path / "a" / "p.svg") == tmp_path / "a" / "p.svg"
    assert b"<svg" in (tmp_path / "a" / "p.svg").read_bytes()[:500]
    plt.close(fig)
