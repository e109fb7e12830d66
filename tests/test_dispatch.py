"""Measured dispatch: the on-disk cache (hits cost no timing, remeasure times again and overwrites,
entries of an older schema are never reused) and the crossover sparsify derives from the kernel
and batched-path timings."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow import dispatch
from sparseflow.bench import timing
from sparseflow.bench.timing import Stats
from sparseflow.ops import table
from sparseflow.sparsify import crossover, refine_crossover


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    return tmp_path


class FakeCompare:
    """Stands in for bench.timing.compare_blocks: records what it was asked to time and returns fixed
    times, so the speedups are known. time_of(name, call) -> ns; name is "dense" or "label|path"."""

    def __init__(self, time_of=None):
        self.calls: list[list[str]] = []
        self.time_of = time_of or (lambda name, call: 100 if name == "dense" else 50)

    def __call__(self, fns, **_kw):
        call = len(self.calls)
        self.calls.append(sorted(fns))
        return {name: Stats((self.time_of(name, call),) * 3) for name in fns}


def case(density=0.5, n=64, k=48):
    w = torch.randn(n, k) * (torch.rand(n, k, generator=torch.Generator().manual_seed(0)) < density)
    return w, {"bitmask": sf.Bitmask.from_dense(w)}


def test_cache_hit_costs_no_timing_and_remeasure_times_again(cache_dir, monkeypatch):
    w, cands = case()
    fake = FakeCompare()
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    first = dispatch.measure_paths(w, cands, (1, 16))
    assert first == {"kernel": {"bitmask": {1: 2.0, 16: 2.0}}, "batched": {"bitmask": {16: 2.0}}}
    assert fake.calls == [["bitmask|kernel", "dense"], ["bitmask|batched", "bitmask|kernel", "dense"]]
    data = json.loads((cache_dir / "dispatch.json").read_text())
    assert data["schema"] == dispatch.SCHEMA and len(data["entries"]) == 3

    fake.calls.clear()
    assert dispatch.measure_paths(w, cands, (1, 16)) == first  # every case is a hit
    assert fake.calls == []

    fake.time_of = lambda name, call: 100 if name == "dense" else 400  # the machine got slower
    again = dispatch.measure_paths(w, cands, (1, 16), remeasure=True)
    assert len(fake.calls) == 2
    assert again["kernel"]["bitmask"] == pytest.approx({1: 0.25, 16: 0.25})
    fake.calls.clear()
    assert dispatch.measure_paths(w, cands, (1, 16)) == again  # overwritten, not appended
    assert fake.calls == []
    assert len(json.loads((cache_dir / "dispatch.json").read_text())["entries"]) == 3


def test_use_cache_false_neither_reads_nor_writes(cache_dir, monkeypatch):
    w, cands = case()
    monkeypatch.setattr(dispatch, "compare_blocks", FakeCompare())
    dispatch.measure_paths(w, cands, (1,), use_cache=False)
    assert not (cache_dir / "dispatch.json").exists()


def test_entries_of_an_older_schema_are_not_reused(cache_dir, monkeypatch):
    w, cands = case()
    keys = [dispatch.case_key(cands["bitmask"], "bitmask", 1, "kernel")]
    # the first cache format: a flat {key: speedup}, timings of the old prefill path
    (cache_dir / "dispatch.json").write_text(json.dumps({k: 9.0 for k in keys}))
    fake = FakeCompare()
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}
    assert len(fake.calls) == 1
    data = json.loads((cache_dir / "dispatch.json").read_text())
    assert data == {"schema": dispatch.SCHEMA, "entries": {keys[0]: 2.0}}
    # an explicit older schema number is dropped the same way
    (cache_dir / "dispatch.json").write_text(json.dumps({"schema": dispatch.SCHEMA - 1, "entries": {keys[0]: 9.0}}))
    assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}
    assert len(fake.calls) == 2


@pytest.mark.parametrize("value", [None, "fast", [1], {}, True, 10**400, "NaN", "Infinity", -2.0, 0])
def test_a_hand_edited_entry_is_a_miss(cache_dir, monkeypatch, value):
    w, cands = case()
    key = dispatch.case_key(cands["bitmask"], "bitmask", 1, "kernel")
    text = json.dumps({"schema": dispatch.SCHEMA, "entries": {key: 0.0}}).replace("0.0", "VALUE")
    literal = value if value in ("NaN", "Infinity") else json.dumps(value)  # json writes NaN / Infinity bare
    (cache_dir / "dispatch.json").write_text(text.replace("VALUE", literal))
    fake = FakeCompare()
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}  # timed again
    assert len(fake.calls) == 1
    assert json.loads((cache_dir / "dispatch.json").read_text())["entries"] == {key: 2.0}


def test_a_damaged_cache_file_counts_as_empty(cache_dir, monkeypatch):
    w, cands = case()
    monkeypatch.setattr(dispatch, "compare_blocks", FakeCompare())
    for text in ("[" * 100_000, "{", "\xff\xfe", json.dumps({"schema": dispatch.SCHEMA, "entries": []})):
        (cache_dir / "dispatch.json").write_text(text)
        assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}


def test_an_unwritable_cache_warns_and_the_timings_are_still_used(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(blocker / "cache"))  # a directory under a file
    monkeypatch.setattr(dispatch, "compare_blocks", FakeCompare())
    dispatch._warn_unwritable.cache_clear()
    w, cands = case()
    with pytest.warns(RuntimeWarning, match="could not write its timing cache"):
        assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}
    m = nn.Sequential(nn.Linear(48, 64))
    with torch.no_grad():
        m[0].weight.copy_(w)
    report = sf.sparsify(m, format="bitmask", m_range=(1,))  # (warned once already)
    assert isinstance(m[0], sf.SparseLinear) and report.layers[0].speedup == {1: 2.0}


def _store_many(cache: str, prefix: str) -> None:
    import os

    os.environ["SPARSEFLOW_CACHE_DIR"] = cache
    from sparseflow import dispatch as d

    for j in range(60):
        d._store({f"{prefix}-{j}": 1.0})


def test_processes_writing_the_cache_at_once_lose_no_entry(cache_dir):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_store_many, args=(str(cache_dir), f"p{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(json.loads((cache_dir / "dispatch.json").read_text())["entries"]) == 120


def test_row_counts_below_one_are_refused(cache_dir):
    w, cands = case()
    with pytest.raises(ValueError, match="row counts must be >= 1"):
        dispatch.measure_paths(w, cands, (0,))


def test_measure_keeps_its_kernel_only_result(cache_dir, monkeypatch):
    w, cands = case()
    fake = FakeCompare()
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    assert dispatch.measure(w, cands, (1, 16)) == {"bitmask": {1: 2.0, 16: 2.0}}
    assert all("bitmask|batched" not in c for c in fake.calls)  # only the kernel is timed
    with pytest.raises(ValueError, match="paths"):
        dispatch.measure_paths(w, cands, (1,), paths=("fast",))


def test_crossover_rule():
    assert crossover({1: 2.0, 16: 0.5, 128: 0.3}, {16: 0.8, 128: 0.9}, (1, 16, 128)) == 1
    assert crossover({1: 2.0, 16: 1.5, 128: 0.3}, {16: 0.8, 128: 0.9}, (1, 16, 128)) == 16
    assert crossover({1: 3.0, 16: 2.0, 128: 1.5}, {16: 0.8, 128: 0.9}, (1, 16, 128)) is None  # kernel always wins
    assert crossover({}, {}, (1, 16)) is None  # nothing measured (measure=False)
    assert crossover({16: 0.5, 128: 0.3}, {16: 0.8, 128: 0.9}, (16, 128)) == 15  # loses at the first count
    assert crossover({1: 2.0, 16: 0.5, 128: 1.2}, {16: 0.8, 128: 0.9}, (1, 16, 128)) == 1  # first loss decides


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 80)).eval()
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape) < 0.5)
    return m


def test_sparsify_uses_the_batched_path_from_its_measured_crossover(cache_dir, monkeypatch):
    # kernel: 2x at 1 row, 0.5x at 2 and 128; batched path: 0.8x at 2, 0.9x at 128 (rows 1 and 2 are
    # adjacent: nothing to bisect, so each layer is timed once per row count, in order)
    def time_of(name, call):
        if name == "dense":
            return 100
        if name.endswith("|batched"):
            return 125 if call % 3 == 1 else 111
        return 50 if call % 3 == 0 else 200

    fake = FakeCompare(time_of)
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    m = mlp()
    report = sf.sparsify(m, format="bitmask", m_range=(1, 2, 128))
    assert len(fake.calls) == 6
    for layer, module in zip(report.layers, (m[0], m[2]), strict=True):
        assert module.dense_above == 1
        assert layer.backend == "cpp+batched" and "above 1 rows" in layer.note
        assert layer.speedup == pytest.approx({1: 2.0, 2: 0.8, 128: 100 / 111})
    x = torch.randn(20, 96)
    with torch.no_grad():
        assert torch.allclose(m(x), mlp()(x), atol=1e-4)  # 20 rows: the batched path, same result


def test_refine_crossover_bisects_where_the_winner_changes():
    def speeds(m):  # the kernel wins below 40 rows, the batched path from 40 on
        return (1.5, 1.0) if m < 40 else (0.8, 0.9)

    def at(m):
        calls.append(m)
        return speeds(m)

    for m_range in ((1, 16, 128), (16, 128)):
        calls = []
        kernel, batched = {m: speeds(m)[0] for m in m_range}, {m: speeds(m)[1] for m in m_range}
        rows = refine_crossover(kernel, batched, m_range, at)
        assert calls == [45, 27, 35]  # geometric middles of 16..128, 16..45, 27..45
        assert rows == (*m_range[:-1], 27, 35, 45, 128)
        assert crossover(kernel, batched, rows) == 35  # was 16
        assert set(kernel) == set(batched) == set(rows)
    rows = refine_crossover(kernel, batched, rows, at, steps=8)  # goes on from 35..45 to the exact row
    assert crossover(kernel, batched, rows) == 39 and 40 in rows and len(rows) <= 5 + 8

    def never(m):
        raise AssertionError(f"timed at {m} rows: nothing to bisect")

    assert refine_crossover({1: 2.0, 16: 1.5}, {16: 0.8}, (1, 16), never) == (1, 16)  # the kernel always wins
    assert refine_crossover({16: 0.5, 128: 0.3}, {16: 0.8, 128: 0.9}, (16, 128), never) == (16, 128)  # loses at once
    assert refine_crossover({1: 2.0, 2: 0.5}, {2: 0.8}, (1, 2), never) == (1, 2)  # adjacent row counts
    assert refine_crossover({}, {}, (1, 16, 128), never) == (1, 16, 128)  # nothing measured
    assert refine_crossover({1: 2.0, 16: 0.5}, {16: 0.8}, (1, 16), lambda m: (None, None)) == (1, 16)  # not timed


def test_sparsify_places_the_crossover_between_its_row_counts(cache_dir, monkeypatch):
    # measured: the kernel 2x up to 24 rows and 0.5x above, the batched path 0.8x everywhere
    asked = []

    def measure_paths(w, cands, rows, **_kw):
        asked.extend(rows)
        (label,) = cands
        return {"kernel": {label: {m: 2.0 if m <= 24 else 0.5 for m in rows}},
                "batched": {label: {m: 0.8 for m in rows if m > 1}}}

    monkeypatch.setattr(dispatch, "measure_paths", measure_paths)
    m = mlp()
    report = sf.sparsify(m, format="bitmask", m_range=(1, 16, 128))
    assert asked == [1, 16, 128, 45, 27, 21] * 2
    for layer, module in zip(report.layers, (m[0], m[2]), strict=True):
        assert module.dense_above == 21  # the last row count bisected where the kernel won (27 lost)
        assert sorted(layer.speedup) == [1, 16, 21, 27, 45, 128]
        assert layer.speedup[21] == 2.0 and layer.speedup[27] == 0.8


def test_sparsify_remeasure_times_again(cache_dir, monkeypatch):
    fake = FakeCompare()
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    sf.sparsify(mlp(), format="bitmask", m_range=(1, 16))
    timed = len(fake.calls)
    assert timed > 0
    sf.sparsify(mlp(), format="bitmask", m_range=(1, 16))
    assert len(fake.calls) == timed  # all hits
    sf.sparsify(mlp(), format="bitmask", m_range=(1, 16), remeasure=True)
    assert len(fake.calls) > timed


def test_a_speedup_above_the_bytes_limit_is_timed_again_and_never_cached(cache_dir, monkeypatch):
    w, cands = case()
    limit = w.numel() * w.element_size() / cands["bitmask"].nbytes
    fake = FakeCompare(lambda name, call: 100 if name == "dense" else 5)  # 20x: dense was disturbed
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    got = dispatch.measure(w, cands, (1,))
    assert len(fake.calls) == dispatch.RETRIES + 1
    assert got == {"bitmask": {1: pytest.approx(limit)}}
    assert not (cache_dir / "dispatch.json").exists() or not json.loads((cache_dir / "dispatch.json").read_text())[
        "entries"]

    fake = FakeCompare(lambda name, call: 100 if name == "dense" else (5 if call == 0 else 80))  # then quiet
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    assert dispatch.measure(w, cands, (1,)) == {"bitmask": {1: pytest.approx(1.25)}}
    assert len(fake.calls) == 2
    assert len(json.loads((cache_dir / "dispatch.json").read_text())["entries"]) == 1


def test_measure_act_times_both_paths_and_caches_per_skipped_fraction(cache_dir, monkeypatch):
    w, _ = case(density=1.0)
    fake = FakeCompare(lambda name, call: 100 if name == "dense" else 40)
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    first = dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 16))
    assert first == {"kernel": {1: 2.5, 16: 2.5}, "batched": {16: 2.5}}
    assert fake.calls == [["dense", "kernel"], ["batched", "dense", "kernel"]]
    fake.calls.clear()
    assert dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 16)) == first  # hits
    assert fake.calls == []
    dispatch.measure_act(w, w.t().contiguous(), "dense", 0.7, (1,))  # another fraction: another case
    assert fake.calls == [["dense", "kernel"]]
    bitmask = sf.Bitmask.from_dense(case(density=0.3)[0].t().contiguous())
    fake.time_of = lambda name, call: 100 if name == "dense" else 1  # 100x: beyond any bytes limit
    out = dispatch.measure_act(w, bitmask, "bitmask", 0.5, (1,))
    assert 1.0 < out["kernel"][1] < 100  # the bytes limit, not the impossible ratio, and not cached
    assert not any("act-bitmask" in k for k in json.loads((cache_dir / "dispatch.json").read_text())["entries"])


def test_a_kernel_path_that_is_the_batched_row_is_timed_once(cache_dir, monkeypatch):
    """On a GPU, formats without a kernel for many rows (bitmask past the GEMV's rows, CSR) run the
    batched row by default: their two paths are one call there, timed once (two timings of it would
    draw a crossover from noise). Simulated here with C++ rows that apply to one row of x only."""
    rows = [replace(b, applies=lambda w, m: m == 1) if b.device == "cpu" and b.name == "cpp" else b
            for b in table.BACKENDS]
    monkeypatch.setattr(table, "BACKENDS", rows)
    fake = FakeCompare(lambda name, call: 100 if name == "dense" else 50 + call)
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    w, cands = case()
    assert not dispatch.default_is_batched("linear", cands["bitmask"], w, 1)
    assert dispatch.default_is_batched("linear", cands["bitmask"], w, 16)
    out = dispatch.measure_paths(w, cands, (1, 16))
    assert fake.calls == [["bitmask|kernel", "dense"], ["bitmask|kernel", "dense"]]
    assert out["batched"]["bitmask"] == {16: out["kernel"]["bitmask"][16]}
    fake.calls.clear()
    out = dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 16))
    assert fake.calls == [["dense", "kernel"], ["dense", "kernel"]]
    assert out["batched"] == {16: out["kernel"][16]}


def test_measure_act_times_the_real_op(cache_dir):
    w = torch.randn(256, 512)
    out = dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 4), reps=3)
    assert set(out["kernel"]) == {1, 4} and set(out["batched"]) == {4}
    assert all(s > 0 for path in out.values() for s in path.values())
    entries = json.loads((cache_dir / "dispatch.json").read_text())["entries"]
    cached = {"|".join(key.rsplit("|", 2)[-2:]): v for key, v in entries.items()
              if "|cpu|torch.float32|256x512|act-dense|d1.00|a0.50|" in key}
    # every ratio is cached but one above its byte limit (2x: half the inputs active), which is
    # reported as the limit and timed again next time (a slow dense call on a busy machine)
    assert cached == {f"m{m}|{path}": s for path, by_rows in out.items() for m, s in by_rows.items() if s != 2.0}
    assert dispatch.case_key(sf.Bitmask.from_dense(w), "bitmask", 1).split("|")[6] == "cpu"  # the device


def calling_fake(lengths: list):
    """A compare_blocks that calls every callable of every block once, records the blocks' lengths
    and returns fixed times (dense 100 ns, the rest 50 ns per call)."""

    def fake(blocks, **_kw):
        lengths.append({name: len(calls) for name, calls in blocks.items()})
        for calls in blocks.values():
            for call in calls:
                call()
        return {name: Stats((100 if name == "dense" else 50,) * 3) for name in blocks}

    return fake


def test_each_timed_sample_runs_over_cold_copies(cache_dir, monkeypatch):
    """On the CPU every sample calls each case once per copy of its weight, enough copies to read
    cold_bytes() between two calls on one, so that no call finds its weight in the caches; from
    COMPUTE_ROWS rows of x (calls bound by arithmetic) at most BATCH_COPIES."""
    import math

    w, cands = case(n=256, k=256)
    lengths, weights = [], set()
    monkeypatch.setattr(timing, "cold_bytes", lambda: 1 << 20)  # 1 MiB: fewer copies than the cap

    monkeypatch.setattr(dispatch, "compare_blocks", calling_fake(lengths))
    real_linear = dispatch.linear
    monkeypatch.setattr(dispatch, "linear", lambda x, w, backend="": weights.add(w.values.data_ptr())
                        or real_linear(x, w, backend=backend))
    out = dispatch.measure_paths(w, cands, (1, dispatch.COMPUTE_ROWS))
    assert out["kernel"]["bitmask"] == {1: 2.0, dispatch.COMPUTE_ROWS: 2.0}
    expected = lambda nbytes: 1 + math.ceil((1 << 20) / nbytes)
    decode, batch = lengths
    assert decode["dense"] == expected(w.numel() * w.element_size()) == 5  # 256 KiB: 4 others read in between
    assert decode["bitmask|kernel"] == expected(cands["bitmask"].nbytes) == len(weights)  # each its own memory
    assert batch == {"dense": dispatch.BATCH_COPIES, "bitmask|kernel": dispatch.BATCH_COPIES,
                     "bitmask|batched": dispatch.BATCH_COPIES}


def test_act_timing_binds_each_copy_once(cache_dir, monkeypatch):
    w = torch.randn(64, 48)
    lengths = []

    monkeypatch.setattr(dispatch, "compare_blocks", calling_fake(lengths))
    binds = []
    real_fast_kernel = dispatch.fast_kernel
    monkeypatch.setattr(dispatch, "fast_kernel",
                        lambda bound, *a: binds.append(bound) or real_fast_kernel(bound, *a))  # kept alive
    dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 2))
    assert lengths[0]["kernel"] == dispatch.MAX_COPIES  # a 12 KiB weight: as many copies as allowed
    assert len({id(b) for b in binds}) == dispatch.MAX_COPIES  # one BoundKernel per copy, kept across row counts
    assert len(binds) == 2 * dispatch.MAX_COPIES  # (called at 1 and 2 rows)


def test_act_batches_the_kernel_runs_itself_are_timed_through_the_bound_kernel(cache_dir, monkeypatch):
    """As ActSparseLinear calls them: a batch the C++ kernel runs as its own GEMM (bf16 with AVX-512
    BF16) through the bound kernel, anything else through the op."""
    from sparseflow.ops.cpu import act_sparse_batch_rows

    w = torch.randn(64, 48, dtype=torch.bfloat16)
    rows = max(2, act_sparse_batch_rows(torch.bfloat16))
    monkeypatch.setattr(dispatch, "compare_blocks", calling_fake([]))
    ops = []
    real_op = dispatch.act_sparse_linear
    monkeypatch.setattr(dispatch, "act_sparse_linear", lambda *a, **kw: ops.append(kw["backend"]) or real_op(*a, **kw))
    dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, rows))
    if act_sparse_batch_rows(torch.bfloat16):
        assert ops == []
    else:
        assert ops and set(ops) == {"batched"}


def test_cold_copies_only_on_the_cpu():
    w = torch.empty(8, 8, device="meta")
    assert dispatch.ColdCopies(w, 256)(1) == [w]


def test_released_copies_are_freed_at_once():
    """A copy that ran through the fast path keeps its bound kernel, whose closure refers back to
    it: release() breaks that cycle, so the copies go without waiting for the cycle collector."""
    import gc
    import weakref

    w = torch.randn(64, 48)
    copies = dispatch.ColdCopies(sf.Bitmask.from_dense(w * (torch.rand(64, 48) < 0.5)), 1 << 10)
    made = copies(1)
    assert len(made) > 1
    for c in made:
        sf.ops.linear(torch.randn(1, 48), c)  # binds a kernel on each
    refs = [weakref.ref(c) for c in made[1:]]
    del made, c
    gc.disable()
    try:
        copies.release()
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_cuda_graph_of_never_captures_what_synchronises(monkeypatch):
    """cuda_graph_of (sparsify(cuda_graphs=True)) runs the calls once, then once more with torch's
    sync debug mode raising, and captures only if that passed: a failed capture would leave the
    process's CUDA random generator unusable. The debug mode is restored either way. (The CUDA
    parts are stand-ins here; tests/test_cuda.py runs it on a GPU.)"""
    import contextlib

    state = {"mode": 0, "captures": 0, "capturing": False}

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, stream=None):
        assert isinstance(stream, Stream)  # captured on the stream that warmed up (its workspaces)
        state["captures"] += 1
        state["capturing"] = True
        try:
            yield
        finally:
            state["capturing"] = False

    fake = dict(Stream=Stream, stream=lambda s: contextlib.nullcontext(), current_stream=Stream,
                get_sync_debug_mode=lambda: state["mode"], CUDAGraph=Graph, graph=graph,
                set_sync_debug_mode=lambda m: state.update(mode=m))
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    runs = []

    def clean():
        runs.append(state["mode"])

    def syncs():
        runs.append(state["mode"])
        if state["mode"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    assert dispatch.cuda_graph_of([clean]) is not None
    assert runs == [0, "error", 0]  # warm-up, screened, captured (the mode restored by then)
    assert state == {"mode": 0, "captures": 1, "capturing": False}
    runs.clear()
    assert dispatch.cuda_graph_of([clean, syncs]) is None
    assert runs == [0, 0, "error", "error"] and state["captures"] == 1  # never captured

    def fails():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # an error is no "cannot be captured"
        dispatch.cuda_graph_of([fails])
    assert state["mode"] == 0

    def breaks_capture():  # a sync the debug mode does not see: the capture itself fails
        if state["capturing"]:
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="random generator may be unusable"):
        assert dispatch.cuda_graph_of([breaks_capture]) is None


def test_machine_key_names_a_forced_act_batch_gemm():
    """Timings taken with a batch GEMM forced (benchmarks) are never reused by the default choice."""
    from sparseflow._ext import _C
    default = dispatch.machine_key()
    try:
        _C.set_act_batch_gemm("zeros")
        forced = dispatch.machine_key()
    finally:
        _C.set_act_batch_gemm("auto")
    assert forced != default and forced.endswith("act-batch-zeros") and dispatch.machine_key() == default


@pytest.mark.parametrize("kernel_takes_batch", [True, False])
def test_measure_act_times_a_batch_the_kernel_runs_itself_once(cache_dir, monkeypatch, kernel_takes_batch):
    """Where the batched path calls the act-sparse kernel itself, the two paths are one call: timed
    once, the same speedup for both (two timings of one call drew crossovers from noise)."""
    fake = FakeCompare(lambda name, call: 100 if name == "dense" else 50 if name == "kernel" else 80)
    monkeypatch.setattr(dispatch, "compare_blocks", fake)
    monkeypatch.setattr(dispatch, "kernel_takes_batch", lambda dtype, rows: kernel_takes_batch and rows >= 2)
    w = torch.randn(32, 48, dtype=torch.bfloat16)
    got = dispatch.measure_act(w, w.t().contiguous(), "dense", 0.5, (1, 16))
    if kernel_takes_batch:
        assert fake.calls == [["dense", "kernel"]] * 2
        assert got == {"kernel": {1: 2.0, 16: 2.0}, "batched": {16: 2.0}}
    else:
        assert fake.calls == [["dense", "kernel"], ["batched", "dense", "kernel"]]
        assert got == {"kernel": {1: 2.0, 16: 2.0}, "batched": {16: 1.25}}


def test_a_cache_lock_held_elsewhere_skips_the_write_instead_of_waiting(cache_dir, monkeypatch):
    """A process that holds the cache's lock and never lets go (stopped, hung) cost sparsify a wait as
    long as its own: now the write gives up after LOCK_WAIT_S, warns, and the timings are still used."""
    fcntl = pytest.importorskip("fcntl")
    import time

    monkeypatch.setattr(dispatch, "LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(dispatch, "_LOCK_GAVE_UP", [])
    monkeypatch.setattr(dispatch, "compare_blocks", FakeCompare())
    w, cands = case()
    with open(cache_dir / "dispatch.json.lock", "a") as holder:  # another open file: flock conflicts with it
        fcntl.flock(holder, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="lock .* is held by another process"):
            assert dispatch.measure_paths(w, cands, (1,))["kernel"]["bitmask"] == {1: 2.0}
        assert time.monotonic() - t0 < 5
    assert not (cache_dir / "dispatch.json").exists()
    dispatch.measure_paths(w, cands, (1,), remeasure=True)  # the lock free again: written
    assert (cache_dir / "dispatch.json").exists()


def test_timings_on_the_kernels_own_thread_pool_have_their_own_key(monkeypatch):
    from sparseflow import _ext

    monkeypatch.delenv("SPARSEFLOW_OWN_POOL", raising=False)
    assert ("own-pool" in dispatch.machine_key().split("|")) == (not _ext._C.shares_torch_threads())
    monkeypatch.setenv("SPARSEFLOW_OWN_POOL", "1")  # (a comparison run: not the timings of a normal one)
    assert "own-pool" in dispatch.machine_key().split("|")
