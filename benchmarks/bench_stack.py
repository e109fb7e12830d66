"""The kernels as a model meets them: a stack of SparseLinear layers (nn.Sequential, each layer's
output the next one's input, M = 1) against the same stack of dense nn.Linear layers, per format.

    python benchmarks/bench_stack.py [--shape 4096x4096] [--dtype bf16] [--rounds 15] [--json PATH]

This is what `bench_kernels.py --flush layers` (its default) stands for: each layer's weight is read
cold, since the other layers of the stack read 2x the last-level cache of sparse weights in between
(and the dense stack runs between two sparse passes), while the code path stays as warm as one
layer leaves it for the next. Ratios are dense / sparse per layer, from the medians of interleaved
rounds (bench.timing.compare) in one process, same dtype and threads. The output of every stack is
checked against its dense twin first."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys

import torch
from torch import nn

import sparseflow as sf
from sparseflow.bench.kernels import DEFAULT_SPECS, DTYPES, KernelSpec, Workload
from sparseflow.bench.timing import cold_bytes, compare
from sparseflow.info import info
from sparseflow.io._atomic import write_result

FORMATS = {"bitmask": "bitmask", "nm": "2:4", "bsr": "block(32,32)", "csr": "csr"}  # kind -> SparseLinear format


def stacks(spec: KernelSpec, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(dense, sparse) stacks of square layers pruned to the spec, enough layers that between two
    calls of one sparse layer the others read cold_bytes() (2x the last-level cache)."""
    layers, sparse, total, last = [], [], 0, 0
    while total - last < cold_bytes() or len(layers) < 2:
        w = Workload(n, k, seed + len(layers), "cpu").pruned(spec)
        lin = nn.Linear(k, n, bias=False, dtype=dtype)
        lin.weight.data.copy_(w / math.sqrt(k * (1 - spec.sparsity)))  # activations keep their scale
        s = sf.SparseLinear.from_linear(lin, format=FORMATS[spec.kind])
        last = sum(b.nbytes for b in s.buffers())
        total += last
        layers.append(lin)
        sparse.append(s)
    return nn.Sequential(*layers), nn.Sequential(*sparse)


def measure(spec: KernelSpec, n: int, k: int, dtype: torch.dtype, x: torch.Tensor, rounds: int, seed: int) -> dict:
    dense, sparse = stacks(spec, n, k, dtype, seed)
    with torch.inference_mode():
        y_dense, y_sparse = dense(x), sparse(x)
        # compared at the output's scale: the rounding of every layer adds up through the stack
        scale = y_dense.float().abs().max().clamp_min(1e-6)
        err = float((y_sparse.float() - y_dense.float()).abs().max() / scale)
        if not math.isfinite(err) or err > 0.05:
            raise SystemExit(f"{spec.label}: the sparse stack differs from the dense one by {err:.3g} of its scale")
        stats = compare({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, warmup=1, reps=rounds)
    d, s = stats["dense"].median / len(dense), stats["sparse"].median / len(dense)
    return {"kernel": spec.label, "layers": len(dense), "dense_s": d, "sparse_s": s, "speedup": d / s,
            "target": spec.target, "max_rel_error": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x4096", help="N x K of every layer (square: each feeds the next)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path)
    a = p.parse_args(argv)
    n, k = (int(v) for v in a.shape.lower().split("x"))
    if n != k:
        p.error("layers of a stack are square (each layer's output is the next one's input)")
    dtype = DTYPES[a.dtype]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(a.seed)).to(dtype)
    rows = []
    print("| format | layers | dense ms/layer | sparse ms/layer | speedup | target |\n|---|---|---|---|---|---|")
    for spec in (s for s in DEFAULT_SPECS if s.kind in FORMATS):
        r = measure(spec, n, k, dtype, x, a.rounds, a.seed)
        rows.append(r)
        print(f"| {r['kernel']} | {r['layers']} | {r['dense_s'] * 1e3:.3f} | {r['sparse_s'] * 1e3:.3f} | "
              f"{r['speedup']:.2f}x | >= {r['target']}x |", flush=True)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta = {"cpu": info()["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__, "shape": [n, k],
            "dtype": a.dtype, "rounds": a.rounds, "date": date,
            "command": " ".join(["python benchmarks/bench_stack.py", *(sys.argv[1:] if argv is None else argv)])}
    print(f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, {date}")
    if a.json:
        write_result(a.json, json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
