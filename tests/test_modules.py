"""SparseLinear, ActSparseLinear, sparsify and whole-model save/load."""

import copy
import json

import pytest
import torch
from conftest import assert_close_2x
from torch import nn

import sparseflow as sf


def pruned_mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(96, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 80)).to(dtype)
    with torch.no_grad():
        m[0].weight.mul_(torch.rand(256, 96) < 0.3)
        m[3].weight.copy_(sf.NM.from_dense(m[3].weight, 2, 4, prune=True).to_dense())
    return m.eval()


@pytest.mark.parametrize("format", ["auto", "bitmask", "csr", "bsr", "block(16,16)", "2:4", "n:m", "dense"])
def test_sparse_linear_matches_linear(format):
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(sf.NM.from_dense(lin.weight, 2, 4, prune=True).to_dense())
    sl = sf.SparseLinear.from_linear(lin, format)
    x = torch.randn(2, 5, 64)
    ref64 = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_close_2x(sl(x), ref64, lin(x))
    assert torch.equal(sl.to_linear().weight, lin.weight)


def test_state_dict_round_trip_into_an_empty_module():
    sl = sf.SparseLinear.from_linear(pruned_mlp()[0], "bitmask")
    fresh = sf.SparseLinear.empty("bitmask", {}, (256, 96), bias=True)
    fresh.load_state_dict(sl.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), sl(x))
    bad = dict(sl.state_dict())
    bad["weight_row_offsets"] = bad["weight_row_offsets"].clone()
    bad["weight_row_offsets"][5] += 1
    with pytest.raises(ValueError, match="row_offsets|row 4|row 5"):
        sf.SparseLinear.empty("bitmask", {}, (256, 96), bias=True).load_state_dict(bad)


def _layer_of(kind: str, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(k, 32)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(32, k) < 0.3)
    if kind.startswith("act-"):
        return sf.ActSparseLinear.from_linear(lin, threshold=0.5, weight_format=kind.removeprefix("act-"))
    return sf.SparseLinear.from_linear(lin, kind)


@pytest.mark.parametrize("kind", ["csr", "block(8,8)", "bitmask", "act-bitmask", "act-dense"])
def test_a_state_dict_of_another_layer_shape_is_refused(kind):
    """The state dict records the dense layer's shape: a CSR or BSR weight of 40 inputs (or a bitmask
    of 60, within a byte of mask of 64) made a valid weight of a 64-input layer, loaded silently."""
    narrow, wide = _layer_of(kind, 60 if "bitmask" in kind else 40), _layer_of(kind, 64, seed=1)
    state = narrow.state_dict()
    assert torch.equal(state["weight_shape"], torch.tensor([32, narrow.in_features]))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=rf"holds a 32x{narrow.in_features} layer .*this module is 32x64"):
        wide.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())  # a refused load changes nothing
    with pytest.raises(ValueError, match="for layer"):  # inside a model: the layer is named
        nn.ModuleDict({"layer": wide}).load_state_dict({f"layer.{k}": v for k, v in state.items()})
    for bad in (torch.tensor([32.0, 64.0]), torch.tensor([32, 64, 1]), torch.tensor([32, 64], dtype=torch.int32)):
        with pytest.raises(ValueError, match="weight_shape must be an int64 tensor"):
            wide.load_state_dict({**before, "weight_shape": bad})
    x = torch.randn(3, 64)
    own = wide.state_dict()
    again = _layer_of(kind, 64, seed=2)
    again.load_state_dict({k: v for k, v in own.items() if k != "weight_shape"})  # a state dict from before the record
    assert torch.equal(again(x), wide(x))
    again.load_state_dict(own)
    assert torch.equal(again(x), wide(x))


def test_sparsify_keeps_outputs_and_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    m = pruned_mlp(torch.bfloat16)
    x = torch.randn(4, 96).to(torch.bfloat16)
    with torch.no_grad():
        ref = m(x)
    report = sf.sparsify(m, format="bitmask", prefill="batched")  # a named format is applied as asked
    assert [r.choice for r in report.layers] == ["bitmask", "bitmask"]
    assert all(isinstance(m[i], sf.SparseLinear) for i in (0, 3))
    assert report.bytes_after < report.bytes_before
    assert "total" in str(report) and '"layers"' in report.to_json()
    y = m(x)
    assert torch.allclose(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
    compiled = torch.compile(m, fullgraph=True)
    assert torch.allclose(compiled(x).float(), y.float(), atol=1e-2, rtol=1e-2)  # grad enabled: backward exists


def test_sparsify_auto_measures_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    m = pruned_mlp()
    report = sf.sparsify(m, m_range=(1, 4))
    for layer in report.layers:
        assert set(layer.speedup) == {1, 4}
        if layer.choice == "dense":  # kept dense only because sparse measured slower
            assert "slower" in layer.note
    assert (tmp_path / "dispatch.json").exists()
    # Caching, with fixed timings: a ratio above its bytes limit (a disturbed run, as on a loaded
    # machine) is not cached, so real timings could rightly be taken again.
    from sparseflow.bench.timing import Stats

    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path / "fixed"))
    calls = []

    def fixed(blocks, **_kw):
        calls.append(1)
        return {name: Stats((100.0 if name == "dense" else 80.0,) * 3) for name in blocks}

    monkeypatch.setattr(sf.dispatch, "compare_blocks", fixed)
    sf.sparsify(pruned_mlp(), m_range=(1, 4))
    assert calls
    calls.clear()
    sf.sparsify(pruned_mlp(), m_range=(1, 4))  # a second time: every measurement is a cache hit
    assert not calls


def test_sparsify_skips_lm_head_and_tied_weights():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.proj = nn.Linear(32, 32)
            self.lm_head = nn.Linear(32, 50, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(self.proj(self.embed(ids)))

    lm = LM()
    report = sf.sparsify(lm, format="bitmask")
    assert [r.name for r in report.layers] == ["proj"]
    assert isinstance(lm.lm_head, nn.Linear)


def test_activation_sparsity_calibration_and_mode_centering():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    calib = [torch.randn(8, 64) for _ in range(4)]
    x = torch.randn(4, 64)
    with torch.no_grad():
        dense = m(x)
    report = sf.sparsify(m, activation_sparsity=0.5, calibration=calib, mode_centering=True, measure=False)
    assert all(r.choice.startswith("act-sparse") for r in report.layers)
    assert all(isinstance(layer, sf.ActSparseLinear) for layer in (m[0], m[2]))
    assert m[0].threshold > 0 and m[0].shift is not None
    with torch.no_grad():
        y = m(x)
    cos = torch.nn.functional.cosine_similarity(y, dense).mean()
    assert cos > 0.8, cos
    with pytest.raises(ValueError, match="calibration"):
        sf.sparsify(pruned_mlp(), activation_sparsity=0.5)
    with pytest.raises(ValueError, match="forward failed on a calibration item") as info:  # wrong width
        sf.sparsify(pruned_mlp(), activation_sparsity=0.5, calibration=[torch.randn(8, 63)], measure=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    one_batch = pruned_mlp()  # a single tensor is one batch, as sf.prune takes it (not one batch per row)
    sf.sparsify(one_batch, activation_sparsity=0.5, calibration=torch.randn(8, 96), measure=False)
    assert isinstance(one_batch[0], sf.ActSparseLinear)


def test_sparsify_leaves_layers_it_cannot_hold_dense_and_converts_the_rest():
    m = pruned_mlp()
    m.append(nn.Linear(80, 8).double())  # float64: no kernel takes it
    m.append(nn.Linear(8, 0))  # empty
    m.append(nn.Linear(4, 4, device="meta"))
    report = sf.sparsify(m, format="bitmask", measure=False)
    assert isinstance(m[0], sf.SparseLinear) and isinstance(m[3], sf.SparseLinear)
    assert all(type(m[i]) is nn.Linear for i in (4, 5, 6))
    notes = {r.name: r.note for r in report.layers}
    assert "float64" in notes["4"] and "empty" in notes["5"] and "meta device" in notes["6"]
    assert all(r.choice == "dense" for r in report.layers if r.name in ("4", "5", "6"))
    str(report), report.to_json()  # the report still prints and serialises
    with pytest.raises(ValueError, match="meta device"):
        sf.SparseLinear.from_linear(nn.Linear(8, 4, device="meta"))


def test_sparsify_n_m_takes_the_ratio_the_weight_has():
    m = pruned_mlp()  # m[0] unstructured, m[3] 2:4
    report = sf.sparsify(m, format="n:m", measure=False)
    assert [r.choice for r in report.layers] == ["dense", "2:4"] and m[3].format_name == "nm"
    assert type(m[0]) is nn.Linear and "left dense: format 'n:m' needs an n:m sparse weight" in report.layers[0].note
    m = pruned_mlp()
    report = sf.sparsify(m, format="2:4", measure=False)  # the same for a ratio named outright
    assert [r.choice for r in report.layers] == ["dense", "2:4"] and "not 2:4 sparse" in report.layers[0].note
    with pytest.raises(ValueError, match="unknown format"):  # a name that is no format at all still raises
        sf.sparsify(pruned_mlp(), format="coo", measure=False)


@pytest.mark.parametrize("kind", ["bitmask", "csr", "bsr", "2:4", "act-dense", "act-bitmask"])
def test_another_layers_buffers_are_refused_not_read_out_of_bounds(kind):
    """functional_call (or assigning buffers) can hand a module buffers it never validated."""
    def make(out_features):
        lin = nn.Linear(32, out_features)
        with torch.no_grad():
            lin.weight.copy_(sf.NM.from_dense(lin.weight, 2, 4, prune=True).to_dense())
        if kind.startswith("act"):
            return sf.ActSparseLinear.from_linear(lin, threshold=0.1, weight_format=kind.removeprefix("act-"))
        return sf.SparseLinear.from_linear(lin, format=kind)

    a, b = make(64), make(16)
    other = {k: v for k, v in b.state_dict().items() if k != "bias"}
    for requires_grad in (False, True):  # the bound kernel's path and the op's
        x = torch.randn(5, 32, requires_grad=requires_grad)
        with pytest.raises(ValueError, match="the weight's buffers"):
            torch.func.functional_call(a, other, (x,))
    own = {k: v.clone() for k, v in a.state_dict().items()}  # valid buffers of the right shape still run
    x = torch.randn(5, 32)
    assert torch.equal(torch.func.functional_call(a, own, (x,)), a(x))


@pytest.mark.parametrize("kind", ["bitmask", "2:4", "dense", "act-dense", "act-bitmask"])
def test_load_state_dict_keeps_the_modules_dtype(kind):
    """As nn.Linear's does: an fp32 checkpoint loaded into a bf16 module leaves it bf16."""
    def make():
        torch.manual_seed(0)
        lin = nn.Linear(32, 16)
        with torch.no_grad():
            lin.weight.copy_(sf.NM.from_dense(lin.weight, 2, 4, prune=True).to_dense())
        if kind.startswith("act"):
            return sf.ActSparseLinear.from_linear(lin, threshold=0.1, shift=torch.randn(32),
                                                  weight_format=kind.removeprefix("act-"))
        return sf.SparseLinear.from_linear(lin, format=kind)

    source, module = make(), make().bfloat16()
    module.load_state_dict(source.state_dict())
    assert {t.dtype for t in module.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    x = torch.randn(3, 32)
    assert torch.equal(module(x.bfloat16()), make().bfloat16()(x.bfloat16()))
    module.load_state_dict({"bias": source.bias}, strict=False)  # a partial load too
    assert module.bias.dtype == torch.bfloat16


def test_sparse_linear_owns_its_bias_and_shift_checks_x():
    lin = nn.Linear(32, 16)
    m = sf.SparseLinear.from_linear(lin, format="bitmask")
    x = torch.randn(2, 32)
    before = m(x)
    with torch.no_grad():
        lin.bias.zero_()  # the source layer's bias is not the module's
    assert torch.equal(m(x), before)
    a = sf.ActSparseLinear.from_linear(lin, threshold=0.1, shift=torch.randn(32))
    with pytest.raises(TypeError, match="x is torch.bfloat16 but the weight is torch.float32"):
        a(x.bfloat16())  # x - shift would have promoted it to float32 silently
    state = a.state_dict()
    state["shift"] = torch.zeros(1)  # would broadcast
    with pytest.raises(ValueError, match="shift must be torch.float32 of shape \\(32,\\)"):
        a.load_state_dict(state)
    assert a.shift.shape == (32,)


def test_mode_centring_folds_the_shift_into_the_bias_with_one_rounding():
    torch.manual_seed(0)
    lin = nn.Linear(512, 64).half()
    shift = (torch.randn(512) * 2 + 3).half()
    a = sf.ActSparseLinear.from_linear(lin, threshold=0.0, shift=shift)
    exact = (lin.bias.double() + lin.weight.double() @ shift.double())
    assert torch.equal(a.bias, exact.half())  # fp16 of the exact sum (two roundings were off by up to 0.07)


def test_entry_points_refuse_what_is_not_a_module(tmp_path):
    for call, name in [(lambda: sf.sparsify("model"), "sf.sparsify"), (lambda: sf.save(None, tmp_path), "sf.save"),
                       (lambda: sf.load(tmp_path, model={}), "sf.load"),
                       (lambda: sf.save_pretrained([], tmp_path), "sf.save_pretrained"),
                       (lambda: sf.export_dense(1, tmp_path), "sf.export_dense"),
                       (lambda: sf.export_compressed_tensors(1, tmp_path), "sf.export_compressed_tensors")]:
        with pytest.raises(TypeError, match=f"{name} expects a torch.nn.Module"):
            call()
    assert not any(tmp_path.iterdir())  # nothing written


def test_act_sparse_linear_threshold_zero_is_exact():
    lin = nn.Linear(40, 24)
    a = sf.ActSparseLinear.from_linear(lin, threshold=0.0)
    x = torch.randn(3, 40)
    ref64 = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_close_2x(a(x), ref64, lin(x))
    shifted = sf.ActSparseLinear.from_linear(lin, threshold=0.0, shift=torch.randn(40))
    assert torch.allclose(shifted(x), lin(x), atol=1e-4)  # the shift folds into the bias exactly


def test_save_load_rebuilds_building_block_models(tmp_path):
    m = pruned_mlp()
    sf.sparsify(m, format="bitmask")
    sf.save(m, tmp_path / "model")
    loaded = sf.load(tmp_path / "model")
    x = torch.randn(3, 96)
    assert torch.equal(loaded(x), m(x))  # bit-exact
    assert isinstance(loaded[0], sf.SparseLinear)


def test_save_load_custom_model_needs_a_skeleton(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 64)

        def forward(self, x):
            return self.a(x).relu()

    net = Net()
    sf.sparsify(net, format="csr")
    sf.save(net, tmp_path)
    with pytest.raises(ValueError, match="model="):
        sf.load(tmp_path)
    loaded = sf.load(tmp_path, model=Net())
    x = torch.randn(2, 32)
    assert torch.equal(loaded(x), net(x))


def test_load_rejects_damaged_checkpoints(tmp_path):
    m = pruned_mlp()
    sf.sparsify(m, format="bitmask")
    sf.save(m, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        sf.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        sf.load(tmp_path / "nowhere")


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_transformers_save_pretrained_round_trip(tmp_path):
    model = tiny_llama()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                mod.weight.copy_(sf.NM.from_dense(mod.weight, 2, 4, prune=True).to_dense())
    ids = torch.randint(0, 100, (1, 7))
    report = sf.sparsify(model, format="2:4")
    assert len(report.layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    with torch.no_grad():
        y = model(ids).logits
    sf.save_pretrained(model, tmp_path)
    loaded = sf.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)
    sf.export_dense(model, tmp_path / "dense")
    import transformers

    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, y, atol=1e-4)


def test_mode_centred_layers_export_only_the_biases_the_model_has(tmp_path):
    """SCAP folds W s into a bias; a Llama's projections have none, so the dense export, to_linear
    and a save / load round trip must not grow one (transformers reported them as unexpected), while
    a layer with its own bias gets it back, the shift taken out."""
    import transformers

    model = tiny_llama()
    calibration = [torch.randint(0, 100, (2, 9)) for _ in range(2)]
    with torch.no_grad():
        y = model(calibration[0]).logits
    sf.sparsify(model, activation_sparsity=0.3, calibration=calibration, mode_centering=True, measure=False)
    acts = {n: m for n, m in model.named_modules() if isinstance(m, sf.ActSparseLinear)}
    assert len(acts) == 14 and all(m.shift is not None and m.bias is not None for m in acts.values())
    assert all(m.to_linear().bias is None for m in acts.values())
    sf.export_dense(model, tmp_path / "dense")
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not dense[1]["unexpected_keys"] and not dense[1]["missing_keys"]
    with torch.no_grad():
        torch.testing.assert_close(dense[0].eval()(calibration[0]).logits, y)
    sf.save_pretrained(model, tmp_path / "sparse")
    loaded = sf.from_pretrained(tmp_path / "sparse")
    assert all(m.folded_bias for m in loaded.modules() if isinstance(m, sf.ActSparseLinear))
    lin = nn.Linear(16, 8)
    own = sf.ActSparseLinear(lin.weight, lin.bias, 0.1, shift=torch.randn(16))
    torch.testing.assert_close(own.to_linear().bias, lin.bias.detach())
    (tmp_path / "sparse" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        sf.from_pretrained(tmp_path / "sparse")


def test_torch_export_of_a_sparse_model():
    m = pruned_mlp()
    sf.sparsify(m, format="bitmask")
    x = torch.randn(3, 96)
    exported = torch.export.export(m, (x,))
    assert any("sparseflow" in str(node.target) for node in exported.graph.nodes)
    assert torch.allclose(exported.module()(x), m(x), atol=1e-6)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("dense_above", [0, 1, 4])
@pytest.mark.parametrize("keep_dense", [False, True])
def test_torch_export_with_a_dynamic_batch_serves_both_sides_of_the_crossover(tmp_path, keep_dense, dense_above,
                                                                              strict):
    """One exported program for decode and prefill: the crossover is a torch.cond on the row count
    (a Python branch pinned the rows to one side: 'Constraints violated'; under strict export the
    row count is no SymInt, and a 1-row call ran the prefill side; with dense_above 0, one row
    failed on the batched backend traced for 8). The program also compiles (fullgraph)."""
    from torch.export import Dim

    m = pruned_mlp()
    m[0], m[3] = sf.SparseLinear.from_linear(m[0], "bitmask"), sf.ActSparseLinear.from_linear(m[3], 0.3)
    for layer in (m[0], m[3]):
        layer.dense_above = dense_above
        layer._keep_dense(keep_dense)
    exported = torch.export.export(m, (torch.randn(8, 96),), dynamic_shapes=({0: Dim("rows", min=1, max=1024)},),
                                   strict=strict)
    torch.export.save(exported, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    compiled = torch.compile(exported.module(), fullgraph=True, dynamic=True)
    for rows in (1, 2, 4, 5, 130):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = m(x)
            torch.testing.assert_close(loaded(x), y)
            torch.testing.assert_close(compiled(x), y)


def test_export_compressed_tensors_reads_back(tmp_path):
    m = pruned_mlp()
    sf.sparsify(m, format="bitmask")
    sf.export_compressed_tensors(m, tmp_path)
    weights = sf.io.read_compressed_tensors(tmp_path)
    assert torch.equal(weights["0.weight"].to_dense(), m[0].weight.to_dense())
    assert torch.equal(weights["3.weight"].to_dense(), m[3].weight.to_dense())


def _rss() -> int:
    """Resident bytes after the allocator hands free memory back (glibc keeps freed heap chunks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_sparsify_frees_the_dense_weights():
    import gc

    torch.manual_seed(0)
    layers = [nn.Linear(2048, 2048) for _ in range(8)]  # 128 MiB of fp32 weights
    for lin in layers:
        with torch.no_grad():
            lin.weight.mul_(torch.rand(2048, 2048) < 0.1)  # 10% dense: CSR keeps ~15% of the bytes
    model = nn.Sequential(*layers)
    del layers
    gc.collect()
    before = _rss()
    report = sf.sparsify(model, format="csr")
    gc.collect()
    after = _rss()
    dense_bytes = report.bytes_before
    assert report.bytes_after < 0.2 * dense_bytes
    # resident memory falls by (nearly) what the compression saved: the dense weights are gone
    assert before - after > 0.6 * (dense_bytes - report.bytes_after), (before, after, dense_bytes)


def test_the_report_says_where_kept_layers_are_slower_than_dense():
    from sparseflow.sparsify import LayerReport, SparsifyReport

    def layer(name, choice, speedup):
        return LayerReport(name, (8, 8), "unstructured", 0.5, choice, "cpp", 128, 64, speedup)

    report = SparsifyReport([layer("a", "bitmask", {1: 2.0, 128: 0.95}),
                             layer("b", "act-sparse(dense)", {1: 2.1, 128: 0.97}),
                             layer("c", "dense", {1: 0.9}), layer("d", "bitmask", {1: 1.5, 128: 1.02})])
    assert report.slower_than_dense() == {128: [0.95, 0.97]}  # a dense layer is not a kept sparse one
    assert "m128: 2 layers (0.95-0.97x)" in str(report)
    assert json.loads(report.to_json())["slower_than_dense"] == {"128": [0.95, 0.97]}
    assert "slower than dense" not in str(SparsifyReport([layer("d", "bitmask", {1: 1.5, 128: 1.02})]))


def test_strict_loading_checks_the_bias_both_ways():
    for make in (lambda lin: sf.SparseLinear.from_linear(lin, "bitmask"),
                 lambda lin: sf.ActSparseLinear.from_linear(lin, 0.1)):
        with_bias, without = make(pruned_mlp()[0]), make(nn.Linear(96, 256, bias=False))
        with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
            without.load_state_dict(with_bias.state_dict())
        state = {k: v for k, v in without.state_dict().items()}
        with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
            with_bias.load_state_dict(state)


def test_sparsify_leaves_linears_whose_parent_reads_their_weight_dense():
    """MultiheadAttention and the transformer layers' fast paths read .weight of their Linear
    children instead of calling them: those stay dense, the report says why, and the model runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0), nn.Linear(64, 32))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.mul_(torch.rand_like(mod.weight) > 0.5)
    model.eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref, ref64 = model(x), copy.deepcopy(model).double()(x.double())
    report = sf.sparsify(model, format="bitmask", measure=False)
    choices = {r.name: (r.choice, r.note) for r in report.layers}
    assert choices["0.self_attn.out_proj"] == ("dense", "MultiheadAttention reads its weight directly")
    assert choices["0.linear1"][0] == choices["0.linear2"][0] == "dense"
    assert choices["1"][0] == "bitmask" and isinstance(model[1], sf.SparseLinear)
    with torch.no_grad():
        assert_close_2x(model(x), ref64, ref)
    acts = nn.Sequential(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), nn.Linear(64, 32)).eval()
    report = sf.sparsify(acts, activation_sparsity=0.3, calibration=[x], measure=False)
    assert [r.name for r in report.layers if r.choice.startswith("act")] == ["1"]


def test_act_sparse_layers_refuse_non_finite_weights():
    lin = pruned_mlp()[0]
    with torch.no_grad():
        lin.weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match="finite weight"):
        sf.ActSparseLinear.from_linear(lin, 0.1)
    for fmt in ("dense", "bitmask"):
        m = sf.ActSparseLinear.from_linear(pruned_mlp()[0], 0.1, weight_format=fmt)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["weight_t" if fmt == "dense" else "weight_t_values"].view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match="finite weight"):
            m.load_state_dict(state)


@pytest.mark.parametrize("weight_format", ["dense", "bitmask"])
def test_dense_equivalents_of_sparse_layers(weight_format):
    """ActSparseLinear.to_linear is the layer whose inputs it thresholds (the folded shift taken back
    out of the bias); bench model's dense baseline (densified) replaces every sparse layer."""
    from sparseflow.bench.model import densified

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(48, 64) < 0.5)
    act = sf.ActSparseLinear.from_linear(lin, threshold=0.0, shift=torch.randn(64), weight_format=weight_format)
    back = act.to_linear()
    x = torch.randn(5, 64)
    assert torch.equal(back.weight, lin.weight)
    torch.testing.assert_close(back(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act(x), lin(x), atol=1e-5, rtol=1e-5)  # threshold 0: nothing skipped
    model = nn.Sequential(act, nn.ReLU(), sf.SparseLinear.from_linear(nn.Linear(48, 8), "bitmask"))
    dense = densified(model)
    assert [type(m) for m in dense] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(model[0], sf.ActSparseLinear)  # a copy: the model itself is left as it was
    torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-5)


def test_bf16_transformers_models_reload_with_their_generation_config(tmp_path):
    """A model converted with .to(bf16) (its rotary table too) reloads bit-exact, with its
    generation config (stop tokens); a hand-converted tied lm_head reloads as it was saved."""
    model = tiny_llama().to(torch.bfloat16)
    model.generation_config.eos_token_id = [2, 7]
    sf.sparsify(model, format="bitmask", measure=False)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        y = model(ids).logits
    sf.save_pretrained(model, tmp_path)
    loaded = sf.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == [2, 7]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.lm_head = sf.SparseLinear.from_linear(tied.lm_head, "dense")
    sf.save_pretrained(tied, tmp_path / "tied")
    with torch.no_grad():
        assert torch.equal(sf.from_pretrained(tmp_path / "tied")(ids).logits, tied(ids).logits)


def test_exports_fold_torch_pruning(tmp_path):
    """A layer pruned with torch.nn.utils.prune (left so by sparsify) is exported as its effective
    weight, which transformers loads (it would re-initialise a missing weight randomly)."""
    import transformers

    model = tiny_llama()
    up = model.model.layers[0].mlp.up_proj
    from torch.nn.utils import prune

    prune.l1_unstructured(up, "weight", amount=0.5)
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        y = model(ids).logits
    sf.export_dense(model, tmp_path / "dense")
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, y, atol=1e-5)
    assert torch.equal(dense.model.layers[0].mlp.up_proj.weight, up.weight)
    sf.export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_save_load_keeps_building_block_options(tmp_path):
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(embed=nn.Embedding(10, 8, max_norm=1.0), flat=nn.Flatten(0),
                                      fc=sf.SparseLinear.from_linear(nn.Linear(24, 4), "bitmask")))
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad():
        y = model(ids)
    sf.save(model, tmp_path)
    loaded = sf.load(tmp_path)
    assert list(loaded._modules) == ["embed", "flat", "fc"] and loaded.embed.max_norm == 1.0
    assert loaded.flat.start_dim == 0
    with torch.no_grad():
        assert torch.equal(loaded(ids), y)


def test_damaged_checkpoints_are_refused_at_load(tmp_path):
    """Parts a kernel or forward would trip over later are refused when the file is read."""
    from sparseflow.io._safetensors import read_safetensors, write_safetensors

    model = nn.Sequential(sf.SparseLinear.from_linear(nn.Linear(16, 8), "bitmask"),
                          sf.ActSparseLinear.from_linear(nn.Linear(8, 4), 0.1, shift=torch.randn(8)))
    sf.save(model, tmp_path)
    metadata, tensors = read_safetensors(tmp_path / "model.safetensors")

    def refused(match, change_tensors=None, change_description=None):
        t, meta = dict(tensors), dict(metadata)
        if change_tensors:
            change_tensors(t)
        if change_description:
            d = json.loads(meta["sparseflow"])
            change_description(d)
            meta["sparseflow"] = json.dumps(d)
        write_safetensors(tmp_path / "model.safetensors", t, meta)
        with pytest.raises(ValueError, match=match):
            sf.load(tmp_path)

    refused(r"0.bias must be torch.float32 of shape \(8,\)", lambda t: t.update({"0.bias": torch.ones(3)}))
    refused(r"1.bias must be torch.float32 of shape \(4,\)", lambda t: t.update({"1.bias": torch.ones(4).half()}))
    refused(r"1.shift must be torch.float32", lambda t: t.update({"1.shift": torch.ones(8).half()}))
    refused("weight_t must be float32, bfloat16 or float16", lambda t: t.update({"1.weight_t": torch.ones(8, 4).int()}))

    def params(d):
        d["architecture"]["children"][0]["spec"]["params"] = {"evil": 1}

    refused("bitmask takes the parameters", change_description=params)

    def dense_above(d):
        d["architecture"]["children"][0]["spec"]["dense_above"] = "x"

    refused("dense_above must be None or an int", change_description=dense_above)

    def no_args(d):
        d["architecture"] = {"class": "Sequential", "children": [{"class": "Linear"}]}

    refused("bad 'Linear' entry", change_description=no_args)


def test_a_file_that_leaves_buffers_unfilled_is_refused(tmp_path):
    """from_pretrained builds the model on the meta device: a file without its saved buffers (rotary
    tables) would leave them there, to fail at the first forward."""
    from sparseflow.io._safetensors import read_safetensors, write_safetensors

    sf.save_pretrained(tiny_llama(), tmp_path)
    metadata, tensors = read_safetensors(tmp_path / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("__buffers__.")}
    assert len(kept) < len(tensors)
    write_safetensors(tmp_path / "model.safetensors", kept, metadata)
    with pytest.raises(ValueError, match="does not fill the model: nothing for .*inv_freq"):
        sf.from_pretrained(tmp_path)


def test_review_regressions_stay_fixed(tmp_path):
    """Older Flatten entries (no args) load; a generation config transformers finds inconsistent is
    saved as it is; a bias loaded before its weight into an empty module is taken; check_outputs
    takes float inputs."""
    from sparseflow.bench.model import check_outputs
    from sparseflow.model_io import build

    assert isinstance(build({"class": "Flatten", "args": {}}), nn.Flatten)
    model = tiny_llama()
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.9  # without do_sample
    sf.save_pretrained(model, tmp_path)
    assert sf.from_pretrained(tmp_path).generation_config.temperature == 0.6
    full = sf.SparseLinear.from_linear(nn.Linear(16, 8), "bitmask").to(torch.bfloat16)
    empty = sf.SparseLinear.empty("bitmask", {}, (8, 16), bias=True)
    state = full.state_dict()
    empty.load_state_dict({"bias": state["bias"]}, strict=False)
    empty.load_state_dict({k: v for k, v in state.items() if k != "bias"}, strict=False)
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(empty(x), full(x))
    mlp = pruned_mlp(torch.bfloat16)
    sf.sparsify(mlp, format="bitmask", measure=False)
    assert check_outputs(mlp, torch.randn(4, 96).to(torch.bfloat16))["ok"]


def test_a_declared_layer_shape_must_fit_the_model(tmp_path):
    """A checkpoint cannot declare a sparse layer of another shape than the model's layer there
    (with keep_dense, the declared shape is what the rebuilt dense copy allocates)."""
    from sparseflow.io._safetensors import read_safetensors, write_safetensors

    model = tiny_llama()
    sf.sparsify(model, format="bitmask", measure=False, prefill="dense")
    sf.save_pretrained(model, tmp_path)
    metadata, tensors = read_safetensors(tmp_path / "model.safetensors")
    description = json.loads(metadata["sparseflow"])
    spec = description["modules"]["model.layers.0.mlp.up_proj"]
    assert spec["keep_dense"]
    spec["shape"] = [1 << 20, spec["shape"][1]]
    write_safetensors(tmp_path / "model.safetensors", tensors, {"sparseflow": json.dumps(description)})
    with pytest.raises(ValueError, match="up_proj is declared 1048576x64, the model's layer there is 128x64"):
        sf.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["bitmask", "act"])
def test_load_state_dict_keeps_the_bias_parameter_a_trainer_holds(kind):
    """As nn.Linear: loading copies into the existing bias Parameter, so its requires_grad and an
    optimizer's hold on it survive a resumed checkpoint."""
    lin = nn.Linear(16, 8)
    make = (lambda: sf.SparseLinear.from_linear(lin, format="bitmask")) if kind == "bitmask" else \
        (lambda: sf.ActSparseLinear.from_linear(lin, threshold=0.1))
    m, saved = make(), make().state_dict()
    m.bias.requires_grad_(True)
    bias = m.bias
    opt = torch.optim.SGD([bias], lr=0.1)
    m.load_state_dict(saved)
    assert m.bias is bias and bias.requires_grad
    m(torch.randn(3, 16)).sum().backward()
    before = bias.detach().clone()
    opt.step()
    assert not torch.equal(m.bias.detach(), before)


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr", "2:4", "act"])
def test_a_module_on_the_meta_device_gives_shapes(fmt):
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(sf.NM.from_dense(lin.weight, 2, 4, prune=True).to_dense())
    m = sf.ActSparseLinear.from_linear(lin, threshold=0.1) if fmt == "act" else sf.SparseLinear.from_linear(lin, fmt)
    y = m.to("meta")(torch.empty(3, 5, 64, device="meta"))
    assert y.is_meta and y.shape == (3, 5, 48)
    m = sf.ActSparseLinear.from_linear(lin, threshold=0.1) if fmt == "act" else sf.SparseLinear.from_linear(lin, fmt)
    m.dense_above = 4  # above the crossover with a dense copy too (it moves to meta with the module)
    m._keep_dense(True)
    y = m.to("meta")(torch.empty(3, 5, 64, device="meta"))
    assert y.is_meta and y.shape == (3, 5, 48)


def test_sparsify_takes_include_exclude_as_prune_does_and_replaces_every_alias(tmp_path, monkeypatch):
    """A string was read character by character ("fc*" matched every layer, "fc1" none), a generator
    was used up by the first layer; a Linear used under two names was replaced under one only (the
    dense weight stayed in the model beside the compressed one)."""
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        m.add_module("fc1", nn.Linear(64, 64))
        m.add_module("fc2", nn.Linear(64, 64))
        sf.prune(m, method="magnitude", sparsity=0.5, include=["*"], progress=False)
        return m

    def converted(**kwargs):
        report = sf.sparsify(model(), format="bitmask", measure=False, **kwargs)
        return [layer.name for layer in report.layers if layer.choice != "dense"]

    assert converted(include="fc1") == ["fc1"]
    assert converted(include="fc*") == ["fc1", "fc2"]
    assert converted(exclude="fc1") == ["0", "2", "fc2"]
    assert converted(include=(p for p in ["fc1", "fc2"])) == ["fc1", "fc2"]
    shared = nn.Linear(64, 64)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    sf.prune(m, method="magnitude", sparsity=0.5, progress=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = m(x)
    sf.sparsify(m, format="bitmask", measure=False)
    assert m[0] is m[2] and isinstance(m[0], sf.SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


def test_sparsify_leaves_meta_layers_dense_with_activation_sparsity_too():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    report = sf.sparsify(m, measure=False, activation_sparsity=0.5, calibration=torch.randn(4, 64, device="meta"))
    assert all(layer.choice == "dense" and "meta" in layer.note for layer in report.layers)
