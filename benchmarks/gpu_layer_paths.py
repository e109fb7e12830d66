"""One 2:4 layer on the GPU at prefill: what each path of the backend table costs when called eagerly,
and what sparsify plans for the layer when it times as CUDA graphs replay (cuda_graphs=True, as
gpu_models.py sparsifies) and when it times eagerly.

    python benchmarks/gpu_layer_paths.py [--shapes 14336x4096,4096x4096] [--rows 512] [--json PATH]

Eager times are medians of 7 samples of 20 synchronised calls (host time included: that is what an
eager prefill pays). Paths: F.linear on the dense weight, the SparseLinear module as sparsify left
it, and every 2:4 row of the table that applies at these rows, called directly. Each path's output
is checked against F.linear on the masked weight first. `--device cpu` only checks the script."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparseflow as sf
from sparseflow.io._atomic import write_result
from sparseflow.ops import table


def pruned_linear(n: int, k: int, device: str, dtype: torch.dtype) -> nn.Linear:
    """A bias-free Linear whose weight keeps the 2 largest of each 4 along K."""
    lin = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        groups = lin.weight.abs().reshape(n, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
        lin.weight.mul_(keep.reshape(n, k))
    return lin


def eager_us(fn, sync, reps: int = 20, samples: int = 7) -> float:
    fn()
    sync()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def paths_of(lin: nn.Linear, mod: nn.Module, x: torch.Tensor) -> dict:
    """name -> call: dense F.linear, the sparsified module, and each 2:4 row of the table that applies."""
    paths = {"F.linear dense": lambda: F.linear(x, lin.weight), "module": lambda: mod(x)}
    for b in table.backends("linear", "nm", x.device.type):
        if b.available() and b.applies(mod.weight, x.shape[0]) and x.dtype in b.dtypes:
            paths[b.name] = lambda b=b: b.fn(x, mod.weight, None)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="14336x4096,4096x4096", help="N x K (out x in features), comma separated")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    out = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        lin = pruned_linear(n, k, args.device, dtype)
        x = torch.randn(args.rows, k, device=args.device, dtype=dtype)
        expect = F.linear(x, lin.weight)
        for graphs in (True, False):
            model = nn.Sequential(lin)
            report = sf.sparsify(model, format="2:4", m_range=(1, args.rows), cuda_graphs=graphs, use_cache=False)
            layer, paths = report.layers[0], paths_of(lin, model[0], x)
            with torch.no_grad():
                for name, fn in paths.items():
                    err = (fn().float() - expect.float()).abs().max().item() / expect.float().abs().max().item()
                    if not err < 2e-2:
                        raise SystemExit(f"{shape} {name}: relative error {err:.2e} against the masked dense layer")
                us = {name: eager_us(fn, sync) for name, fn in paths.items()}
            timing = "as graphs" if graphs else "eagerly"
            print(f"{shape}, sparsify timing {timing}: {layer.backend}, speedups "
                  f"{ {m: round(s, 2) for m, s in sorted(layer.speedup.items())} } {layer.note}")
            print("  eager us at", args.rows, "rows:", {name: round(t, 1) for name, t in us.items()})
            out.append({"shape": shape, "sparsify_timing": timing, "backend": layer.backend, "note": layer.note,
                        "speedup": layer.speedup, "eager_us": us})
    if args.json:
        write_result(args.json, json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": args.rows,
            "dtype": str(dtype), "results": out}, indent=1))


if __name__ == "__main__":
    main()
