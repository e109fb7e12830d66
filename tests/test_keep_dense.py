"""keep_dense / sparsify(prefill="dense"): above its crossover a sparse layer runs F.linear on a dense
copy of its weight, so the model is never slower than dense at any row count; the copy is rebuilt
on load and never saved."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_2x
from safetensors import safe_open
from torch import nn

import sparseflow as sf
from sparseflow.ops import act_sparse_linear_reference, table


def pruned(k=72, n=40, seed=0, dtype=torch.float32, keep=0.4):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, k) < keep)
    return lin


@pytest.fixture
def no_sparse_backend(monkeypatch):
    """Fails any call of a CPU backend of the table (the dense copy must not need one)."""
    def refuse(*_args):
        raise AssertionError("a sparse backend ran above the crossover")
    rows = [table.Backend(b.op, b.format, b.device, b.name, refuse, b.dtypes, b.applies, b.available, None)
            if b.device == "cpu" else b for b in table.BACKENDS]
    monkeypatch.setattr(table, "BACKENDS", rows)


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr"])
def test_rows_above_the_crossover_run_the_dense_copy(fmt, no_sparse_backend):
    lin = pruned()
    sl = sf.SparseLinear(sf.SparseLinear.from_linear(lin, fmt).weight, lin.bias, dense_above=4, keep_dense=True)
    assert torch.equal(sl.dense_copy, lin.weight)
    x = torch.randn(3, 5, 72)  # 15 rows
    with torch.no_grad():
        assert torch.equal(sl(x), F.linear(x, lin.weight, lin.bias))
        compiled = torch.compile(sl, fullgraph=True)
        assert torch.equal(compiled(x), F.linear(x, lin.weight, lin.bias))


def test_below_the_crossover_the_sparse_kernel_still_runs():
    lin = pruned()
    sl = sf.SparseLinear(sf.Bitmask.from_dense(lin.weight.detach()), lin.bias, dense_above=4, keep_dense=True)
    sl.dense_copy.fill_(float("nan"))  # would show if the copy were used
    x = torch.randn(4, 72)
    assert_close_2x(sl(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()), lin(x))


def test_the_copy_is_not_saved_and_is_rebuilt_on_load(tmp_path):
    model = nn.Sequential(pruned(), nn.ReLU(), pruned(40, 24, seed=1))
    model[0] = sf.SparseLinear(sf.Bitmask.from_dense(model[0].weight.detach()), model[0].bias, 2, keep_dense=True)
    model[2] = sf.ActSparseLinear.from_linear(model[2], 0.1, weight_format="bitmask")
    model[2]._keep_dense(True)
    assert "0.dense_copy" not in model.state_dict() and "2.dense_copy" not in model.state_dict()
    sf.save(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not any("dense_copy" in k for k in f.keys())
    assert json.loads((tmp_path / "sparseflow.json").read_text())["modules"]["0"]["keep_dense"] is True
    loaded = sf.load(tmp_path)
    assert torch.equal(loaded[0].dense_copy, model[0].dense_copy)
    assert torch.equal(loaded[2].dense_copy, model[2].dense_copy)
    x = torch.randn(20, 72)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_act_sparse_dense_copy_runs_the_dense_layer_at_prefill():
    """Without a copy, prefill rows get the thresholded product; with one (prefill="dense"), the
    layer's dense product, as TEAL does; decode rows are thresholded either way."""
    lin = pruned()
    x = torch.randn(32, 72)
    x[3, 5] = float("nan")
    for weight_format in ("dense", "bitmask"):
        act = sf.ActSparseLinear.from_linear(lin, 0.5, weight_format=weight_format)
        ref64 = act_sparse_linear_reference(x.double(), lin.weight.detach().t().double(), 0.5, lin.bias.double())
        ref = act_sparse_linear_reference(x, lin.weight.detach().t(), 0.5, lin.bias)
        dense64 = F.linear(x.double(), lin.weight.detach().double(), lin.bias.double())
        with torch.no_grad():
            batched = act(x)  # 32 rows > dense_above=16: the batched path
            act._keep_dense(True)
            copy = act(x)
            compiled = torch.compile(act, fullgraph=True)(x)
            decode = act(x[:4])
        assert torch.equal(batched.isnan(), ref64.isnan())
        keep = ~ref64.isnan().any(1)
        assert_close_2x(batched[keep], ref64[keep], ref[keep])
        for y in (copy, compiled):
            assert torch.equal(y.isnan(), dense64.isnan())
            keep = ~dense64.isnan().any(1)
            assert_close_2x(y[keep], dense64[keep], F.linear(x, lin.weight, lin.bias)[keep])
        assert not torch.allclose(copy[4:], ref[4:], atol=1e-3)  # the threshold did change the product
        torch.testing.assert_close(copy, compiled, equal_nan=True, rtol=1e-6, atol=1e-6)
        assert_close_2x(decode[[0, 1, 2]], ref64[[0, 1, 2]], ref[[0, 1, 2]])


def test_sparsify_prefill_dense(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    model = nn.Sequential(pruned(), nn.ReLU(), pruned(40, 24, seed=1))
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    report = sf.sparsify(model, format="bitmask", m_range=(1, 8), prefill="dense")
    for i, layer in zip((0, 2), report.layers, strict=True):
        m = model[i]
        assert isinstance(m, sf.SparseLinear) and torch.equal(m.dense_copy, dense[i // 2])
        assert m.dense_above is not None and m.dense_above <= 8  # unmeasured rows (above 8) run dense
        assert layer.bytes_after == m.weight.nbytes + dense[i // 2].numel() * 4
        assert layer.backend == "cpp+dense" and "dense copy" in layer.note
    with pytest.raises(ValueError, match="prefill"):
        sf.sparsify(nn.Sequential(pruned()), prefill="fast")


def test_a_partial_load_rebuilds_the_copy():
    lin, other = pruned(), pruned(seed=1)
    sl = sf.SparseLinear(sf.CSR.from_dense(lin.weight.detach()), lin.bias, dense_above=2, keep_dense=True)
    new = sf.SparseLinear(sf.CSR.from_dense(other.weight.detach()), lin.bias)
    sl.load_state_dict(new.state_dict(), strict=False)
    assert torch.equal(sl.dense_copy, other.weight)
    x = torch.randn(8, 72)
    with torch.no_grad():
        assert torch.allclose(sl(x), F.linear(x, other.weight, lin.bias), atol=1e-5)


def test_float64_above_the_crossover_is_refused_clearly():
    act = sf.ActSparseLinear.from_linear(pruned(), 0.5)
    act._keep_dense(True)
    with torch.no_grad(), pytest.raises(TypeError, match="x is torch.float64 but the weight is torch.float32"):
        act(torch.randn(32, 72, dtype=torch.float64))


def test_plan_rows_keeps_a_copy_only_where_asked_or_where_auto_measured_slower():
    from sparseflow.sparsify import plan_rows

    m_range = (1, 16, 128)
    kernel, batched = {1: 2.0, 16: 1.2, 128: 0.8}, {16: 1.0, 128: 0.95}
    plan = plan_rows(kernel, batched, m_range, "batched")
    assert (plan.dense_above, plan.keep_dense, plan.backend) == (16, False, "cpp+batched")
    assert plan.speedup == {1: 2.0, 16: 1.2, 128: 0.95}
    plan = plan_rows(kernel, batched, m_range, "auto")  # 0.95x at 128 rows: a copy
    assert (plan.dense_above, plan.keep_dense, plan.backend) == (16, True, "cpp+dense")
    assert plan.speedup == {1: 2.0, 16: 1.2, 128: 1.0} and "m128: 0.95x" in plan.note
    assert plan_rows(kernel, batched, m_range, "dense").keep_dense
    plan = plan_rows(kernel, {16: 1.0, 128: 0.99}, m_range, "auto")  # within the timing noise: no copy
    assert (plan.dense_above, plan.keep_dense) == (16, False)
    assert plan_rows(kernel, {16: 1.0, 128: 0.99}, m_range, "auto", slower=1.0).keep_dense  # act-sparse layers
    plan = plan_rows({1: 2.0, 16: 0.9, 128: 0.8}, {16: 0.95, 128: 1.02}, m_range, "auto")
    assert (plan.dense_above, plan.keep_dense) == (1, True)  # dense from the first row count it beat the kernel
    plan = plan_rows({1: 2.0, 16: 1.5}, {16: 1.2}, (1, 16), "dense")  # the kernel always won: dense above 16
    assert (plan.dense_above, plan.keep_dense, plan.speedup) == (16, True, {1: 2.0, 16: 1.5})
    assert plan_rows({1: 2.0, 16: 1.5}, {16: 1.2}, (1, 16), "auto") == plan_rows({1: 2.0, 16: 1.5}, {16: 1.2},
                                                                              (1, 16), "batched")
    # a path that cannot run inside a CUDA graph (measured 0 with cuda_graphs=True): a dense copy
    # above the last row count that can, also with prefill="batched"
    for prefill in ("batched", "auto"):
        plan = plan_rows({1: 1.4, 16: 1.2, 128: 0.0}, {16: 0.0, 128: 0.0}, m_range, prefill)
        assert (plan.dense_above, plan.keep_dense, plan.speedup) == (16, True, {1: 1.4, 16: 1.2, 128: 1.0})


def test_plan_layer_bisects_where_dense_starts_to_beat_the_kernel():
    """A layer that keeps a dense copy runs its kernel up to the refined row count where dense beats
    it, not only up to the last row count of m_range where the kernel won."""
    from sparseflow.sparsify import plan_layer

    def kernel_at(m):  # 2x at one row, level with dense at 10, behind it from there
        return 2.0 - m / 10
    asked = []

    def measure_at(m):
        asked.append(m)
        return kernel_at(m), 0.3
    kernel, batched = {1: kernel_at(1), 16: kernel_at(16), 128: 1.3}, {16: 0.3, 128: 1.3}
    plan = plan_layer(kernel, batched, (1, 16, 128), "auto", measure_at)
    assert asked == [4, 8, 11]  # kernel against dense between 1 and 16 (the batched path never beat it there)
    assert (plan.dense_above, plan.keep_dense) == (8, True)
    assert plan.speedup == pytest.approx({1: 1.9, 4: 1.6, 8: 1.2, 11: 1.0, 16: 1.0, 128: 1.0})
    assert batched[4] == 0.3  # the timings taken are kept with the others
    asked.clear()
    plan = plan_layer({1: 1.9, 16: 1.2, 128: 1.1}, {16: 1.0, 128: 1.05}, (1, 16, 128), "auto", measure_at)
    assert asked == [] and not plan.keep_dense  # no copy: nothing more to time
    plan = plan_layer({1: 1.9, 16: 1.2, 128: 0.9}, {16: 1.0, 128: 0.9}, (1, 16, 128), "dense", measure_at)
    assert asked == [45, 27, 21]  # (2 - m / 10 there: behind dense from 16 on)
    assert (plan.dense_above, plan.keep_dense) == (16, True)


@pytest.mark.parametrize("prefill", ["batched", "auto"])
def test_sparsify_measures_act_sparse_layers(tmp_path, monkeypatch, prefill):
    """Each act-sparse layer is timed for its target fraction of skipped inputs: one that loses to
    dense at m_range[0] stays dense; the others switch paths at their measured crossover, and with
    prefill="auto" keep a dense copy only where their batch path measured slower than dense."""
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    from sparseflow import dispatch

    asked = []

    def fake_measure_act(dense_w, w_t, weight_format, sparsity, rows, **_kw):
        asked.append((tuple(dense_w.shape), tuple(w_t.shape), weight_format, sparsity, rows))
        if dense_w.shape[0] == 24:  # the small last layer: slower than dense at decode
            return {"kernel": {1: 0.8, 16: 0.7, 128: 0.6}, "batched": {16: 0.9, 128: 0.95}}
        return {"kernel": {m: 2.0 if m == 1 else 0.95 if m <= 16 else 0.9 for m in rows},
                "batched": {m: 1.0 if m <= 16 else 0.93 for m in rows if m > 1}}

    monkeypatch.setattr(dispatch, "measure_act", fake_measure_act)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(72, 40), nn.ReLU(), pruned(40, 24, seed=1)).eval()
    calib = [torch.randn(8, 72) for _ in range(2)]
    report = sf.sparsify(model, activation_sparsity=0.5, calibration=calib, prefill=prefill)
    layer = ((40, 72), (72, 40), "dense", 0.5)
    assert asked == [(*layer, (1, 16, 128)), (*layer, (4,)), (*layer, (2,)),  # the crossover bisected in 1..16
                     ((24, 40), (40, 24), "bitmask", 0.5, (1, 16, 128))]
    act, dense_layer = model[0], model[2]
    assert isinstance(act, sf.ActSparseLinear) and isinstance(dense_layer, nn.Linear)
    assert report.layers[1].choice == "dense" and "act-sparse measured slower (0.80x)" in report.layers[1].note
    assert act.dense_above == 1  # from 16 rows the batch path (1.0x) beats the kernel (0.95x); so does dense
    first = report.layers[0]
    if prefill == "batched":
        assert act.dense_copy is None and first.backend == "cpp+batched"
        assert first.speedup == {1: 2.0, 2: 1.0, 4: 1.0, 16: 1.0, 128: 0.93}
        assert first.bytes_after == first.bytes_before == 72 * 40 * 4
    else:
        assert torch.equal(act.dense_copy, act.weight_t.t()) and first.backend == "cpp+dense"
        assert first.speedup == {1: 2.0, 2: 1.0, 4: 1.0, 16: 1.0, 128: 1.0}
        assert first.bytes_after == 2 * first.bytes_before
    x = torch.randn(130, 72)
    with torch.no_grad():
        y = model(x)
        sf.save(model, tmp_path / "saved")
        loaded = sf.load(tmp_path / "saved")
        assert torch.equal(loaded(x), y)  # the plan survives a save and load
    assert loaded[0].dense_above == 1 and (loaded[0].dense_copy is None) == (prefill == "batched")


def test_sparsify_sends_unmeasured_batches_of_act_layers_to_the_batch_path(tmp_path, monkeypatch):
    """Where the kernel won at every measured row count, rows past the largest one take the batch
    path (the row kernel would read the weight once per row); with decode alone measured, the
    module's default crossover holds."""
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    from sparseflow import dispatch

    def kernel_always_wins(dense_w, w_t, weight_format, sparsity, rows, **_kw):
        return {"kernel": {m: 2.0 for m in rows}, "batched": {m: 1.0 for m in rows if m > 1}}

    monkeypatch.setattr(dispatch, "measure_act", kernel_always_wins)
    calib = [torch.randn(8, 72)]
    for m_range, above in (((1, 16, 128), 128), ((1,), 16)):
        model = nn.Sequential(nn.Linear(72, 40)).eval()
        report = sf.sparsify(model, activation_sparsity=0.5, calibration=calib, m_range=m_range)
        assert model[0].dense_above == above and report.layers[0].backend == "cpp+batched"
        assert f"batched above {above} rows (not measured there)" in report.layers[0].note


def test_a_dense_copy_refuses_another_dtype_as_the_kernels_do():
    lin = pruned()
    layers = [sf.SparseLinear(sf.Bitmask.from_dense(lin.weight.detach()), lin.bias, dense_above=4, keep_dense=True),
              sf.ActSparseLinear.from_linear(lin, 0.1)]
    layers[1].dense_above = 4
    layers[1]._keep_dense(True)
    for layer in layers:
        layer.to(torch.bfloat16)
        for rows in (2, 17):  # the kernel, then the dense copy
            with pytest.raises(TypeError, match="x is torch.float32 but the weight is torch.bfloat16"):
                layer(torch.randn(rows, lin.in_features))


@pytest.mark.parametrize("kind", ["bitmask", "2:4", "csr", "act-dense", "act-bitmask"])
def test_an_in_place_edit_reaches_the_dense_copy_too(kind):
    """keep_dense: the prefill rows' dense copy is made again when the weight buffers change in place,
    so decode and prefill rows see the same weight."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.copy_(sf.NM.from_dense(lin.weight, 2, 4, prune=True).to_dense())
    if kind.startswith("act"):
        m = sf.ActSparseLinear(lin.weight, lin.bias, 0.0, weight_format=kind[4:], dense_above=4, keep_dense=True)
        buffer = m.weight_t if kind == "act-dense" else m.weight_t_values
    else:
        m = sf.SparseLinear.from_linear(lin, format=kind)
        m.dense_above = 4
        m._keep_dense(True)
        buffer = m.weight_values
    with torch.no_grad():
        buffer.mul_(2)
        for rows in (1, 8):  # one row: the kernel; eight: the dense copy
            x = torch.randn(rows, 32)
            torch.testing.assert_close(m(x), F.linear(x, 2 * lin.weight, lin.bias))


def test_a_load_between_validation_and_the_call_cannot_mix_two_weights():
    """Another thread's load_state_dict assigns the buffers one by one: the forward validates and runs
    one snapshot of them (it re-read them after validating: a 99% dense row_offsets with a 1% dense
    values buffer sent the C++ decompression out of bounds)."""
    torch.manual_seed(0)
    dense, sparse = pruned(96, 80, keep=0.99), pruned(96, 80, keep=0.05, seed=1)
    mod = sf.SparseLinear.from_linear(dense, "bitmask", dense_above=4)
    small = sf.SparseLinear.from_linear(sparse, "bitmask")
    check = mod._kernel.check_valid

    def check_then_a_load_starts(*args, **kwargs):
        check(*args, **kwargs)
        mod.weight_values = small.weight_values.clone()  # the first assignment of that load

    mod._kernel.check_valid = check_then_a_load_starts
    x = torch.randn(20, 96)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), dense(x))  # the weight it validated


def test_a_dense_copy_is_stamped_with_the_buffers_it_was_made_from():
    """A load that lands while a copy is being made: the copy keeps the stamp of the buffers it was
    made from, so the next call makes it again (stamped after, it stayed stale for good)."""
    torch.manual_seed(0)
    a, b = pruned(64, 48, seed=2), pruned(64, 48, seed=3)
    mod = sf.SparseLinear.from_linear(a, "bitmask", dense_above=4)
    mod._keep_dense(True)
    new_state = sf.SparseLinear.from_linear(b, "bitmask").state_dict()
    with torch.no_grad():
        mod.weight_values.mul_(1.0)  # an in-place edit: the next prefill call makes the copy again
    register, fired = mod.register_buffer, []

    def register_buffer(name, t, persistent=True):
        if name == "dense_copy" and not fired:  # between making the copy and keeping it
            fired.append(1)
            mod.load_state_dict(new_state)
        return register(name, t, persistent)

    mod.register_buffer = register_buffer
    x = torch.randn(20, 64)
    with torch.no_grad():
        mod(x)
        del mod.register_buffer
        torch.testing.assert_close(mod(x), b(x))
        torch.testing.assert_close(mod(x[:1]), b(x[:1]))
