"""One sparse layer on the GPU at prefill (a 2:4 weight, or a dense weight with 50% activation
sparsity): what each path of the backend table costs when called eagerly, and what sparsify plans
for the layer when it times as CUDA graphs replay (cuda_graphs=True, as gpu_models.py sparsifies)
and when it times eagerly.

    python benchmarks/gpu_layer_paths.py [--kind 2:4|act] [--shapes 14336x4096,4096x4096] [--rows 512]
                                         [--json PATH]

Eager times are medians of 7 samples of 20 synchronised calls (host time included: that is what an
eager prefill pays); "host" is the same loop's time to return without the final synchronisation,
what the CPU spends issuing each call. Paths: F.linear on the dense weight, the sparsified module
as sparsify left it, and every row of the table for that op and format that applies at these rows,
called directly. Each path's output is checked against its plain-torch reference first (F.linear on
the masked weight; on the thresholded x for act). `--device cpu` only checks the script."""

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


def eager_us(fn, sync, reps: int = 20, samples: int = 7) -> tuple[float, float]:
    """Median us per call, synchronised, and the host's share: the time until the loop returns."""
    fn()
    sync()
    times, host = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host.append((time.perf_counter() - t0) / reps * 1e6)
        sync()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times), statistics.median(host)


def paths_of(lin: nn.Linear, mod: nn.Module, x: torch.Tensor) -> dict:
    """name -> call: dense F.linear, the sparsified module, and each row of the table that applies."""
    paths = {"F.linear dense": lambda: F.linear(x, lin.weight), "module": lambda: mod(x)}
    if isinstance(mod, sf.ActSparseLinear):
        w_t = mod.w_t()
        for b in table.backends("act_sparse_linear", mod.weight_format, x.device.type):
            if b.available() and b.applies(w_t, x.shape[0]) and x.dtype in b.dtypes:
                paths[b.name] = lambda b=b: b.fn(x, w_t, mod.threshold, None)
        return paths
    for b in table.backends("linear", "nm", x.device.type):
        if b.available() and b.applies(mod.weight, x.shape[0]) and x.dtype in b.dtypes:
            paths[b.name] = lambda b=b: b.fn(x, mod.weight, None)
    return paths


def sparsified(lin: nn.Linear, kind: str, rows: int, graphs: bool):
    """The layer as sparsify leaves it (one Sequential), its report row, and its plain-torch reference."""
    model = nn.Sequential(lin)
    if kind == "act":
        calibration = [torch.randn(rows, lin.in_features, device=lin.weight.device, dtype=lin.weight.dtype)]
        report = sf.sparsify(model, activation_sparsity=0.5, calibration=calibration, m_range=(1, rows),
                             cuda_graphs=graphs, use_cache=False)
        mod = model[0]
        if not isinstance(mod, sf.ActSparseLinear):
            return model[0], report.layers[0], None
        return mod, report.layers[0], lambda x: F.linear(x.masked_fill(x.abs() <= mod.threshold, 0), lin.weight)
    report = sf.sparsify(model, format="2:4", m_range=(1, rows), cuda_graphs=graphs, use_cache=False)
    return model[0], report.layers[0], lambda x: F.linear(x, lin.weight)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("2:4", "act"), default="2:4", help="a 2:4 weight, or 50%% activation sparsity")
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
        lin = pruned_linear(n, k, args.device, dtype) if args.kind == "2:4" else \
            nn.Linear(k, n, bias=False, device=args.device, dtype=dtype)
        x = torch.randn(args.rows, k, device=args.device, dtype=dtype)
        for graphs in (True, False):
            mod, layer, reference = sparsified(lin, args.kind, args.rows, graphs)
            timing = "as graphs" if graphs else "eagerly"
            print(f"{shape}, sparsify timing {timing}: {layer.choice}, {layer.backend}, speedups "
                  f"{ {m: round(s, 2) for m, s in sorted(layer.speedup.items())} } {layer.note}")
            if reference is None:  # left dense: nothing sparse to time
                continue
            paths = paths_of(lin, mod, x)
            with torch.no_grad():
                expect = reference(x).float()
                for name, fn in paths.items():
                    if name == "F.linear dense":
                        continue
                    err = (fn().float() - expect).abs().max().item() / expect.abs().max().item()
                    if not err < 2e-2:
                        raise SystemExit(f"{shape} {name}: relative error {err:.2e} against its reference")
                us = {name: eager_us(fn, sync) for name, fn in paths.items()}
            print("  eager us at", args.rows, "rows (host us):",
                  {name: f"{t:.1f} ({h:.1f})" for name, (t, h) in us.items()})
            out.append({"shape": shape, "kind": args.kind, "sparsify_timing": timing, "backend": layer.backend,
                        "note": layer.note, "speedup": layer.speedup,
                        "eager_us": {name: t for name, (t, _) in us.items()},
                        "host_us": {name: h for name, (_, h) in us.items()}})
    if args.json:
        write_result(args.json, json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": args.rows,
            "dtype": str(dtype), "results": out}, indent=1))


if __name__ == "__main__":
    main()
