"""Conversion speed of the weight formats: from_dense and to_dense of one large weight.

Each format gets a weight with the sparsity it is meant for (Bitmask 50% random, N:M 2:4, BSR 32x32
at 90% block sparsity, CSR 95% random) and is timed as the median of a few runs, after one warm-up.
The issue asks that conversion runs "in well under a second" for a 14336x4096 weight.

    python benchmarks/bench_formats.py                       # 14336x4096 bf16, torch's thread count
    python benchmarks/bench_formats.py --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sparseflow as sf
from sparseflow.io._atomic import write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_sparse(shape, dtype, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen).to(dtype)
    return w.masked_fill_(torch.rand(shape, generator=gen) < sparsity, 0)


TWO_OF_FOUR = torch.tensor([[i in pair for i in range(4)] for pair in itertools.combinations(range(4), 2)])


def two_four(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Each group of 4 keeps one of the 6 ways to choose 2, at random."""
    rows, cols = shape
    choice = torch.randint(0, len(TWO_OF_FOUR), (rows, cols // 4), generator=gen)
    return torch.randn(shape, generator=gen).to(dtype).mul_(TWO_OF_FOUR[choice].view(rows, cols))


def block_sparse(shape, dtype, block, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    rows, cols = shape
    bm, bk = block
    w = torch.randn(shape, generator=gen).to(dtype)
    keep = torch.rand(-(-rows // bm), -(-cols // bk), generator=gen) >= sparsity
    mask = keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:rows, :cols]
    return w.mul_(mask)


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float, list[float]]:
    """Median wall time, median process CPU time (all threads) and every run's wall time (their
    minimum is the least disturbed run on a shared machine)."""
    fn()  # warm-up: allocator, lazy init
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), wall


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=14336)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    shape = (args.rows, args.cols)
    gen = torch.Generator().manual_seed(0)

    cases = [
        ("bitmask", "50% random", random_sparse(shape, dtype, 0.5, gen), sf.Bitmask.from_dense),
        ("nm", "2:4", two_four(shape, dtype, gen), lambda w: sf.NM.from_dense(w, n=2, m=4)),
        ("bsr", "90% of 32x32 blocks", block_sparse(shape, dtype, (32, 32), 0.9, gen),
         lambda w: sf.BSR.from_dense(w, block=(32, 32))),
        ("csr", "95% random", random_sparse(shape, dtype, 0.95, gen), sf.CSR.from_dense),
    ]

    rows = []
    for name, sparsity, w, convert in cases:
        fmt = convert(w)
        assert torch.equal(fmt.to_dense(), w), f"{name}: round trip is not exact"
        t_from, cpu_from, runs_from = median_seconds(lambda w=w, convert=convert: convert(w), args.repeats)
        t_to, cpu_to, runs_to = median_seconds(fmt.to_dense, args.repeats)
        t_detect, cpu_detect, runs_detect = median_seconds(lambda w=w: sf.detect_pattern(w), args.repeats)
        rows.append({
            "format": name, "sparsity": sparsity, "density": round(fmt.density, 4),
            "detected": str(sf.detect_pattern(w)),
            "dense_bytes": w.numel() * w.element_size(), "nbytes": fmt.nbytes,
            "from_dense_s": t_from, "to_dense_s": t_to, "detect_pattern_s": t_detect,
            "cpu_s": {"from_dense": cpu_from, "to_dense": cpu_to, "detect_pattern": cpu_detect},
            "runs": {"from_dense": runs_from, "to_dense": runs_to, "detect_pattern": runs_detect},
            "min_s": {"from_dense": min(runs_from), "to_dense": min(runs_to),
                      "detect_pattern": min(runs_detect)},
        })

    result = {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "torch": torch.__version__, "sparseflow": sf.__version__,
        "machine": platform.machine(), "cpu": sf.info()["cpu"], "loadavg_before": _loadavg(), "results": rows,
    }

    print(f"shape {shape[0]}x{shape[1]} {result['dtype']}, {result['threads']} threads, seconds: median of "
          f"{args.repeats} runs (best run); load average before: {result['loadavg_before']}")
    header = (f"{'format':<8} {'sparsity':<20} {'from_dense':>16} {'to_dense':>16} {'detect_pattern':>16} "
              f"{'nbytes/dense':>13}  detected")
    print(header)
    print("-" * len(header))
    for r in rows:
        steps = ("from_dense", "to_dense", "detect_pattern")
        cells = "".join(f" {r[k + '_s']:>8.3f} ({r['min_s'][k]:.3f})" for k in steps)
        ratio = r["nbytes"] / r["dense_bytes"]
        print(f"{r['format']:<8} {r['sparsity']:<20}{cells} {ratio:>13.3f}  {r['detected']}")
    if args.json:
        write_result(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
