"""`sparseflow demo`: prune random Llama-shaped layers into each format, check every kernel
against dense torch, time it against dense F.linear at decode (M = 1) and write a JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import formats, ops
from .info import info

CASES = [  # (label, make format from a dense weight, how to prune the dense weight)
    ("bitmask 50%", formats.Bitmask.from_dense, "unstructured", 0.5),
    ("bitmask 70%", formats.Bitmask.from_dense, "unstructured", 0.7),
    ("2:4", lambda w: formats.NM.from_dense(w, 2, 4), "2:4", 0.5),
    ("BSR 32x32 90%", lambda w: formats.BSR.from_dense(w, (32, 32)), "block", 0.9),
    ("CSR 95%", formats.CSR.from_dense, "unstructured", 0.95),
]


def prune_random(w: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Magnitude-prunes w to the pattern (block: whole 32x32 blocks by their norm)."""
    if pattern == "2:4":
        return formats.NM.from_dense(w, 2, 4, prune=True).to_dense()
    if pattern == "block":
        n, k = w.shape
        norms = w.float().view(n // 32, 32, k // 32, 32).norm(dim=(1, 3))
        keep = norms >= norms.flatten().quantile(sparsity)
        return w * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
    cut = w.float().abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
    return w * (w.float().abs() > cut)


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(out_dir: str = "sparseflow-demo", quick: bool = False, show: bool = True) -> dict:
    torch.manual_seed(0)
    n, k = (1024, 1024) if quick else (4096, 4096)
    dtype = torch.bfloat16
    dense_w = torch.randn(n, k).to(dtype)
    x = torch.randn(1, k).to(dtype)
    rows, ok = [], True
    for label, make, pattern, sparsity in CASES:
        w = prune_random(dense_w, pattern, sparsity)
        sparse = make(w)
        y = ops.linear(x, sparse)
        ref = ops.linear(x, sparse, backend="reference")
        exact = F.linear(x.double(), w.double())
        err = (y.double() - exact).abs().max().item()
        torch_err = (F.linear(x, w).double() - exact).abs().max().item()
        passed = err <= 2 * torch_err + 1e-2 * max(1.0, exact.abs().max().item())
        ok &= passed
        t_sparse, t_dense = [], []
        dense_fn = lambda w=w: F.linear(x, w)
        sparse_fn = lambda sparse=sparse: ops.linear(x, sparse)
        for _ in range(5 if quick else 15):  # interleaved, so both see the same machine state
            t_dense.append(median_time(dense_fn, 5))
            t_sparse.append(median_time(sparse_fn, 5))
        td, ts = sorted(t_dense)[len(t_dense) // 2], sorted(t_sparse)[len(t_sparse) // 2]
        rows.append({
            "case": label, "shape": [n, k], "dtype": str(dtype),
            "density": round(w.count_nonzero().item() / w.numel(), 4),
            "max_err": err, "torch_dense_err": torch_err, "matches_reference": bool(torch.equal(y, ref)) or passed,
            "correct": passed, "bytes_dense": w.numel() * w.element_size(), "bytes_sparse": sparse.nbytes,
            "dense_us": td * 1e6, "sparse_us": ts * 1e6, "speedup": td / ts,
        })
    report = {"ok": ok, "machine": info(), "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if show:
        print(f"sparseflow demo: [{n}x{k}] {dtype} weight, x [1, {k}], {info()['threads']} threads, "
              f"ISA {info()['isa_in_use']}")
        print(f"{'case':<16}{'correct':>9}{'memory':>10}{'dense us':>10}{'sparse us':>11}{'speedup':>9}")
        for r in rows:
            mem = r["bytes_sparse"] / r["bytes_dense"]
            print(f"{r['case']:<16}{'yes' if r['correct'] else 'NO':>9}{mem:>9.0%} {r['dense_us']:>9.0f}"
                  f"{r['sparse_us']:>11.0f}{r['speedup']:>8.2f}x")
        print(f"report: {out / 'report.json'}")
    return report
