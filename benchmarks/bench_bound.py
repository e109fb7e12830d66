"""What the modules' bound-kernel fast path (python/sparseflow/ops/bound.py) saves: the same sparse
models decode one token with the fast path on and off (off: every layer goes through the custom
op, as before it existed), interleaved in one process, plus the per-call time of one small layer
with warm and with cold caches.

    python benchmarks/bench_bound.py [--rounds 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import sparseflow as sf
from sparseflow.bench.model import decode_step_fn
from sparseflow.io._atomic import write_result
from sparseflow.models import llama
from sparseflow.nn import act_sparse_linear, sparse_linear

MODULES = (sparse_linear, act_sparse_linear)


@contextlib.contextmanager
def fast_path(on: bool):
    saved = [m.fast_kernel for m in MODULES]
    if not on:
        for m in MODULES:
            m.fast_kernel = lambda *args: None
    try:
        yield
    finally:
        for m, f in zip(MODULES, saved, strict=True):
            m.fast_kernel = f


def models(vocab: int):
    torch.manual_seed(0)
    base = llama(2048, 8192, 4, vocab=vocab)
    out = {}
    for name, pattern, fmt in (("2:4", "2:4", "2:4"), ("unstructured 50%", "unstructured", "bitmask")):
        m = llama(2048, 8192, 4, vocab=vocab)
        m.load_state_dict(base.state_dict())
        sf.prune(m, method="magnitude", sparsity=0.5, pattern=pattern, progress=False)
        sf.sparsify(m, format=fmt, m_range=(1,))
        out[name] = m
    m = llama(2048, 8192, 4, vocab=vocab)
    m.load_state_dict(base.state_dict())
    sf.sparsify(m, activation_sparsity=0.5, calibration=[torch.randint(0, vocab, (1, 32)) for _ in range(4)])
    out["activation 50%"] = m
    return out


def per_call(rounds: int = 300) -> dict:
    """One 64x64 bitmask layer, M = 1: microseconds per call, warm and after evicting the caches."""
    lin = torch.nn.Linear(64, 64).to(torch.bfloat16)
    layer = sf.SparseLinear.from_linear(lin, "bitmask")
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    evict = torch.ones((64 << 20) // 8, dtype=torch.int64)
    out = {}
    with torch.inference_mode():
        for label, fn in (("nn.Linear", lambda: lin(x)), ("on", lambda: layer(x)), ("off", lambda: layer(x))):
            with fast_path(label != "off"):
                for _ in range(50):
                    fn()
                t0 = time.perf_counter()
                for _ in range(rounds):
                    fn()
                warm = (time.perf_counter() - t0) / rounds
                cold = []
                for _ in range(rounds // 3):
                    evict.sum()
                    t0 = time.perf_counter()
                    fn()
                    cold.append(time.perf_counter() - t0)
                out[label] = {"warm_us": warm * 1e6, "cold_us": sorted(cold)[len(cold) // 2] * 1e6}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    calls = per_call()
    for k, v in calls.items():
        print(f"64x64 layer, {k:<10} warm {v['warm_us']:6.1f} us   cold {v['cold_us']:6.1f} us")
    steps = {k: decode_step_fn(m, torch.randint(0, args.vocab, (1, 64))) for k, m in models(args.vocab).items()}
    times = {(k, on): [] for k in steps for on in (True, False)}
    for step in steps.values():  # warm-up, both paths
        for on in (True, False):
            with fast_path(on):
                step()
    for _ in range(args.rounds):
        for k, step in steps.items():
            for on in (True, False):
                with fast_path(on):
                    t0 = time.perf_counter()
                    step()
                    times[(k, on)].append(time.perf_counter() - t0)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    rows = []
    print(f"{'variant':<20}{'op path ms':>12}{'bound ms':>10}{'saved':>8}")
    for k in steps:
        off, on = med[(k, False)] * 1e3, med[(k, True)] * 1e3
        rows.append({"variant": k, "op_path_ms": off, "bound_ms": on, "speedup": off / on})
        print(f"{k:<20}{off:>12.2f}{on:>10.2f}{off / on:>7.2f}x")
    info = sf.info()
    print(f"Llama-shaped 2048/8192/4 layers, bf16, decode at context 64, {info['threads']} threads, {info['cpu']}")
    if args.json:
        write_result(args.json, json.dumps({"machine": info, "per_call": calls, "decode": rows}, indent=1))


if __name__ == "__main__":
    main()
