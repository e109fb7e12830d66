"""The batched CPU path (what a SparseLinear runs above its crossover) against dense F.linear, and the
alternatives it was chosen over: the weight decompressed whole (C++, into a reused buffer) before one
GEMM, and other chunk sizes.

    python benchmarks/bench_batched.py [--shape 4096x4096 ...] [--dtype bf16,fp32] [--m 16,64,128,512]
                                       [--format bitmask,2:4] [--chunk-mib 2,8] [--whole] [--json PATH]

Ratios are dense time / path time (above 1: faster than dense), from the medians (or, --stat min,
the best) of interleaved rounds in one process (sparseflow.bench.timing.compare), same dtype and
threads as torch. The batched path:
rows of the weight decompressed by the C++ kernels into a buffer of about max(8 MiB, 2 x the bytes
of x) (sparseflow.ops.cpu.chunk_rows), multiplied by torch's GEMM into their slice of y."""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.bench.timing import compare
from sparseflow.io._atomic import write_result
from sparseflow.ops import cpu

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def weight(fmt: str, n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen).to(dtype)
    if fmt == "bitmask":
        return sf.Bitmask.from_dense(w * (torch.rand(n, k, generator=gen) < 0.5))
    if ":" in fmt:
        n_, m_ = (int(v) for v in fmt.split(":"))
        return sf.NM.from_dense(w, n_, m_, prune=True)
    raise ValueError(f"format must be bitmask or N:M, got {fmt!r}")


def whole(x, w):
    """The alternative: the whole weight decompressed (C++) into a reused buffer, then one GEMM."""
    n, k = w.shape
    buf = cpu._scratch(n * k, w.dtype).view(n, k)
    cpu._decompressor(w)(0, n, buf.data_ptr(), k, torch.get_num_threads())
    return F.linear(x, buf)


def paths(x, w, dense_w, chunks, with_whole):
    fns = {"dense": lambda: F.linear(x, dense_w), "batched": lambda: sf.ops.linear(x, w, backend="batched")}
    for c in chunks:
        fns[f"{c:g}"] = lambda c=c: cpu.decompress_linear(x, w, None, int(c * (1 << 20)))
    if with_whole:
        fns["whole"] = lambda: whole(x, w)
    return fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="NxK (repeatable; default 4096x4096, 14336x4096, 4096x14336)")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--m", default="16,64,128,512")
    p.add_argument("--format", default="bitmask,2:4")
    p.add_argument("--chunk-mib", default="", help="also time fixed chunk sizes, e.g. 2,8 (MiB)")
    p.add_argument("--whole", action="store_true", help="also time whole-weight decompression + one GEMM")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="ratios of median times (default) or of best times (min: for a machine other processes "
                        "keep busy, which hurts the path with more synchronisation points most); the JSON has both")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shape or ["4096x4096", "14336x4096", "4096x14336"])]
    ms = [int(v) for v in args.m.split(",")]
    chunks = [float(v) for v in args.chunk_mib.split(",") if v]
    info = sf.info()
    load = os.getloadavg()[0]
    print(f"{info['cpu']} ({info['isa_in_use']}), {info['threads']} threads, torch {info['torch']}, "
          f"load {load:.2f}, {datetime.date.today().isoformat()}")
    head = ["format", "dtype", "N x K", "M", "dense ms", "batched ms", "batched"]
    head += [f"{c:g} MiB chunks" for c in chunks] + (["whole"] if args.whole else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for fmt in args.format.split(","):
        for dname in args.dtype.split(","):
            dtype = DTYPES[dname]
            for n, k in shapes:
                w = weight(fmt, n, k, dtype, gen)
                dense_w = w.to_dense()
                for m in ms:
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    st = compare(paths(x, w, dense_w, chunks, args.whole), warmup=2, reps=args.reps, max_seconds=10.0)
                    stat = {name: (s.median if args.stat == "median" else s.min) for name, s in st.items()}
                    d = stat["dense"]
                    ratio = {name: d / s for name, s in stat.items() if name != "dense"}
                    cells = [fmt, dname, f"{n}x{k}", str(m), f"{d * 1e3:.2f}", f"{stat['batched'] * 1e3:.2f}",
                             f"**{ratio['batched']:.2f}x**"]
                    cells += [f"{ratio[f'{c:g}']:.2f}x" for c in chunks]
                    cells += [f"{ratio['whole']:.2f}x"] if args.whole else []
                    print("| " + " | ".join(cells) + " |", flush=True)
                    rows.append({"format": fmt, "dtype": dname, "n": n, "k": k, "m": m, "dense_s": d,
                                 "ratios": ratio, "median_s": {name: s.median for name, s in st.items()},
                                 "min_s": {name: s.min for name, s in st.items()}})
    result = {"date": datetime.date.today().isoformat(), "machine": info, "load_start": load,
              "load_end": os.getloadavg()[0], "args": vars(args), "rows": rows}
    if args.json:
        write_result(args.json, json.dumps(result, indent=1))
    print(f"load {load:.2f} -> {result['load_end']:.2f}")
    return result


if __name__ == "__main__":
    main()
