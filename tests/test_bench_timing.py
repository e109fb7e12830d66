"""The kernel benchmark's "layers" mode (bench/kernels.py): each timed sample rotates through copies
of the weight so that every call reads it cold, and its times are per call."""

import pytest
import torch

from sparseflow.bench import kernels as K
from sparseflow.bench.timing import MAX_COLD_COPIES, cold_bytes
from sparseflow.formats import CSR


def context(flush: str) -> K.Context:
    return K.Context(K.Options(flush=flush), bandwidth=None, flush=None)


def test_layers_mode_rotates_enough_separate_copies():
    w = torch.randn(1024, 1024)  # 4 MiB
    copies = context("layers").copies(w, w.nbytes)
    assert copies[0] is w
    # between two calls on one copy, the others are read: at least cold_bytes() of them
    assert (len(copies) - 1) * w.nbytes >= cold_bytes()
    assert len({c.data_ptr() for c in copies}) == len(copies)
    assert all(torch.equal(c, w) for c in copies)


def test_layers_mode_copies_formats_and_caps_small_weights():
    dense = torch.randn(64, 64)
    dense[torch.rand(64, 64) < 0.9] = 0
    w = CSR.from_dense(dense)
    copies = context("layers").copies(w, w.nbytes)
    assert len(copies) == MAX_COLD_COPIES  # a small weight: capped
    for name in w.tensors():  # every buffer in memory of its own
        assert len({c.tensors()[name].data_ptr() for c in copies}) == len(copies)
    assert torch.equal(copies[-1].to_dense(), dense)


def test_flush_modes_time_the_weight_itself():
    w = torch.randn(8, 8)
    for flush in ("torch", "numpy", "none"):
        assert context(flush).copies(w, w.nbytes) == [w]


def test_a_block_is_timed_as_one_sample_and_reported_per_call(monkeypatch):
    now = [0]
    calls = {"a": 0, "b": 0}

    def step(name: str, ns: int):
        def call():
            calls[name] += 1
            now[0] += ns
        return call

    monkeypatch.setitem(K.CLOCKS, "wall", lambda: now[0])
    ctx = K.Context(K.Options(flush="layers", reps=7, warmup=1, max_seconds=None), bandwidth=None, flush=None)
    stats = ctx.compare({"a": [step("a", 1000), step("a", 3000), step("a", 2000)], "b": step("b", 500)})
    assert calls == {"a": 3 * 8, "b": 8}  # every call of the block in every round, warm-up included
    assert stats["a"].samples_ns == (2000,) * 7  # (1000 + 3000 + 2000) / 3
    assert stats["b"].samples_ns == (500,) * 7


def test_layers_mode_copies_cpu_weights_only():
    w = torch.empty(1024, 1024, device="meta")  # its sizes are not this CPU's caches'
    assert context("layers").copies(w, 4 << 20) == [w]


def test_sync_waits_for_queued_work_inside_each_sample():
    """Work a call only queues (a GPU's) is timed until it is done: `sync` runs before each timed
    call, untimed, and after it, timed; dispatch's GPU measurements rely on it."""
    from sparseflow.bench.timing import compare

    now, queued, log = [0], [0], []

    def launch():  # returns at once; its 900 ns of work finish at the next sync
        now[0] += 100
        queued[0] += 900

    def sync():
        log.append(now[0])
        now[0] += queued[0]
        queued[0] = 0

    stats = compare({"a": launch}, warmup=2, reps=5, clock=lambda: now[0], sync=sync, min_reps=5)
    assert stats["a"].samples_ns == (1000,) * 5  # launch + the queued work, not the launch alone
    assert len(log) == 10
    no_sync = compare({"a": launch}, warmup=0, reps=3, clock=lambda: now[0])
    assert no_sync["a"].samples_ns == (100,) * 3


def test_block_weights_keep_the_nearest_whole_number_of_blocks():
    """A per-block coin left a one-block 64x64 weight at 50% all zeros half the time (density 0)."""
    from sparseflow.bench.kernels import KernelSpec, Workload, make_specs

    for seed in range(6):
        w = Workload(64, 64, seed=seed).pruned(KernelSpec("bsr", 0.5, block=(64, 64)))
        assert bool((w != 0).any())  # one block: kept (the nearest whole number, at least one)
    w = Workload(256, 130, seed=0).pruned(KernelSpec("bsr", 0.75, block=(32, 32)))
    # (130 columns: 5 blocks wide, the last one 2 columns)
    kept = sum(bool((w[r:r + 32, c:c + 32] != 0).any()) for r in range(0, 256, 32) for c in range(0, 130, 32))
    assert kept == round(0.25 * 8 * 5)
    with pytest.raises(ValueError, match="not both"):
        make_specs(["act"], [0.7], 0.3)
