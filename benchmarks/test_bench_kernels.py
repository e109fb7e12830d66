"""pytest-benchmark suite: each kernel of the issue's table (sparseflow.bench.kernels.DEFAULT_SPECS)
with every backend the table has for it, at 4096x4096, M=1, bf16, plus the dense F.linear
baseline, all in one group so pytest-benchmark lines them up. Each call reads its weight cold, as
bench_kernels.py's default (--flush layers) has it: the calls go round cold copies of the weight
(2x the LLC in all); each kernel is checked against the reference before timing.

    pytest benchmarks --benchmark-only                      # collected only with --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-json out.json

The table with ratios, limits and bandwidth is `python benchmarks/bench_kernels.py`."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparseflow import ops
from sparseflow.bench import kernels as K
from sparseflow.bench.timing import cold_copies
from sparseflow.ops.bound import unbind

N, K_IN, M = 4096, 4096, 1
DTYPE = torch.bfloat16
ROUNDS, WARMUP = 30, 3
GROUP = f"linear {N}x{K_IN} M={M} {K.DTYPE_NAMES[DTYPE]}"


def _backends(spec: K.KernelSpec) -> list:
    return [
        b
        for b in ops.table.backends(spec.op, spec.format, "cpu")
        if b.name != "reference" and DTYPE in b.dtypes and b.available()
    ]


CASES = [
    pytest.param(spec, b.name, id=f"{spec.label.replace(' ', '_')}-{b.name}")
    for spec in K.DEFAULT_SPECS
    for b in _backends(spec)
]


@pytest.fixture(scope="module")
def workload():
    return K.Workload(N, K_IN)


def _bench(benchmark, calls, **info):
    """Times the calls in turn, one per round (each on its own copy of the weight)."""
    benchmark.group = GROUP
    benchmark.extra_info.update(info)
    turn = itertools.cycle(calls)
    # every copy called once first: its first call binds the kernel (and validates the weight)
    benchmark.pedantic(lambda: next(turn)(), rounds=ROUNDS, warmup_rounds=max(WARMUP, len(calls)), iterations=1)


def test_dense(benchmark, workload):
    x, w = workload.x(M, 0.0, DTYPE), workload.dense(DTYPE)
    nbytes = K.dense_bytes(w, x)
    calls = [lambda w=w: F.linear(x, w) for w in cold_copies(w, nbytes)]
    _bench(benchmark, calls, kernel="dense F.linear", bytes=nbytes)


@pytest.mark.parametrize(("spec", "backend"), CASES)
def test_sparse(benchmark, workload, spec, backend):
    w, x = workload.weight(spec, DTYPE), workload.x(M, spec.act_sparsity, DTYPE)
    w_dense = workload.pruned(spec, DTYPE)
    row = next(b for b in _backends(spec) if b.name == backend)
    if not row.applies(w, M):
        pytest.skip(f"{row.key} does not apply to this weight at M={M}")
    with K.poisoned_outputs(row):
        y = K.op_call(spec, x, w, backend)()
    ok, _, _, message = K.check_output(y, K.reference_output(spec, x, w_dense), F.linear(x, w_dense))
    assert ok, f"{spec.label} via {row.key} is wrong: {message}"
    nbytes = K.sparse_bytes(spec, w, x)
    copies = cold_copies(w, nbytes)
    _bench(
        benchmark,
        [K.op_call(spec, x, c, backend) for c in copies],
        kernel=spec.label,
        backend=row.key,
        bytes=nbytes,
        limit=K.dense_bytes(w_dense, x) / nbytes,
        target=spec.target,
    )
    unbind(*copies[1:])
