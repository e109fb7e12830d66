#!/usr/bin/env python
"""One command for a GPU machine: build the CUDA extension, run the GPU tests, benchmark every GPU
kernel against torch, write one markdown table and one JSON file.

    python benchmarks/gpu_suite.py            # or: bash benchmarks/gpu_suite.sh

Steps (each one reported, none aborts the others; the whole run keeps to --budget-s, default 570 s):
1. build: pip install --no-build-isolation --no-deps -e . -Ccmake.define.SPARSEFLOW_CUDA=ON
2. tests: pytest -m cuda (with SPARSEFLOW_TRITON_AUTOTUNE=0: first config only, to bound compile time)
3. bench (a fresh process, so the new extension is loaded): decode M=1 and prefill M=2048 on
   (N, K) = (4096, 4096), (14336, 4096), (4096, 14336), fp16 and bf16, every GPU kernel vs
   torch dense F.linear (cuBLAS), torch's semi-structured 2:4 and torch's BSR (to_sparse_bsr):
   - act-sparse: 50% of the inputs at or below the threshold (Triton and CUDA C++ kernels)
   - 2:4: Triton N:M, CUDA C++ 2:4 GEMV (M <= 16), torch semi-structured (cuSPARSELt/CUTLASS)
   - BSR 64x64 at 90% block sparsity: Triton vs torch's BSR
   - bitmask at 50% (Triton GEMV, M = 1)
   Times are medians over CUDA-graph replays (no launch overhead), dense and kernel interleaved;
   decode weights rotate through copies larger than L2 so GEMVs read DRAM as in a real model.
   Each result also reports its fraction of the byte limit (dense bytes / compressed bytes) and of
   the measured copy bandwidth.

Targets (H100): act-sparse 50% >= 1.7x dense at M=1; 2:4 decode >= 1.4x at M=1; BSR 64x64 at 90%
faster than torch's BSR; 2:4 prefill >= 1.2x.

Without a GPU, `--dry-run` lists the cases and renders the report from placeholder numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K): out, in features
DEFAULT_MS = (1, 2048)
DEFAULT_DTYPES = ("fp16", "bf16")
ACT_SPARSITY = 0.5
BSR_BLOCK = (64, 64)
BSR_SPARSITY = 0.9
BITMASK_DENSITY = 0.5

TARGETS = [
    # (name, family, m, kernels whose best counts, kind, threshold)
    ("act-sparse 50% GEMV >= 1.7x dense (M=1)", "act_sparse", 1, ("triton", "cuda"), "speedup", 1.7),
    ("2:4 decode GEMV >= 1.4x dense (M=1)", "2:4", 1, ("triton", "cuda"), "speedup", 1.4),
    ("BSR 64x64 at 90% faster than torch BSR (M=1)", "bsr64", 1, ("triton",), "vs_torch_bsr", 1.0),
    ("BSR 64x64 at 90% faster than torch BSR (M=2048)", "bsr64", 2048, ("triton",), "vs_torch_bsr", 1.0),
    ("2:4 prefill >= 1.2x dense (M=2048)", "2:4", 2048, ("torch 2:4", "triton"), "speedup", 1.2),
]


@dataclass
class Result:
    family: str  # act_sparse | 2:4 | bsr64 | bitmask
    kernel: str  # triton | cuda | torch 2:4 | torch bsr
    n: int
    k: int
    m: int
    dtype: str
    us: float | None = None
    dense_us: float | None = None
    speedup: float | None = None  # dense_us / us
    limit: float | None = None  # decode: bytes(dense weight) / bytes(read by the kernel)
    of_limit: float | None = None  # speedup / limit
    gbps: float | None = None  # decode: bytes read / time
    of_copy: float | None = None  # gbps / copy bandwidth
    rel_err: float | None = None  # max |y - ref| / max |ref|
    status: str = "ok"  # ok | mismatch | error | skipped
    note: str = ""


@dataclass
class Report:
    machine: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    copy_gbps: float | None = None
    results: list = field(default_factory=list)
    targets: list = field(default_factory=list)


# ---- pure-Python parts (checked without a GPU by --dry-run) -------------------------------------
def evaluate_targets(results: list[Result]) -> list[dict]:
    out = []
    for name, family, m, kernels, kind, threshold in TARGETS:
        cases = []
        for n, k, dtype in sorted({(r.n, r.k, r.dtype) for r in results if r.family == family and r.m == m}):
            rows = [r for r in results if (r.family, r.n, r.k, r.m, r.dtype) == (family, n, k, m, dtype)]
            ours = [r for r in rows if r.kernel in kernels and r.status == "ok" and r.us]
            best = min(ours, key=lambda r: r.us) if ours else None
            if kind == "speedup":
                value = best.speedup if best else None
            else:
                torch_bsr = next(
                    (r for r in rows if r.kernel == "torch bsr" and r.status == "ok" and r.us), None
                )
                value = torch_bsr.us / best.us if best and torch_bsr else None
            cases.append(
                dict(
                    n=n,
                    k=k,
                    dtype=dtype,
                    kernel=best.kernel if best else None,
                    value=value,
                    met=value is not None and value >= threshold,
                )
            )
        met = sum(c["met"] for c in cases)
        out.append(
            dict(
                target=name,
                threshold=threshold,
                measure=kind,
                met=met,
                cases=len(cases),
                worst=min((c["value"] for c in cases if c["value"] is not None), default=None),
                detail=cases,
            )
        )
    return out


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def render_markdown(report: Report, command: str) -> str:
    mach = report.machine
    lines = [
        "# sparseflow GPU suite",
        "",
        f"- date: {mach.get('date', '-')}",
        f"- machine: {mach.get('gpu', '-')} ({mach.get('sm_count', '-')} SMs, "
        f"L2 {mach.get('l2_mb', '-')} MB); torch {mach.get('torch', '-')}, CUDA {mach.get('cuda', '-')}, "
        f"Triton {mach.get('triton', '-')}, CUDA C++ kernels built: {mach.get('cuda_ext', '-')}",
        f"- command: `{command}`",
        f"- copy bandwidth (device to device): {_fmt(report.copy_gbps, '.0f', ' GB/s')}",
        "- times: median of CUDA-graph replays, dense and kernel interleaved; decode weights rotate "
        "through copies larger than L2. speedup = dense / kernel. limit = dense weight bytes / bytes "
        "the kernel reads (decode).",
        "",
        "## Steps",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for name, step in report.steps.items():
        detail = str(step.get("detail", "")).replace("|", "/").replace("\n", " ")[:200]
        lines.append(
            f"| {name} | {step.get('status', '-')} | {_fmt(step.get('seconds'), '.0f')} | {detail} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| target | met | worst | per case (N x K dtype: value, kernel) |",
        "|---|---|---|---|",
    ]
    for t in report.targets:
        per = "; ".join(
            f"{c['n']}x{c['k']} {c['dtype']}: {_fmt(c['value'], '.2f', 'x')} {c['kernel'] or ''}".strip()
            for c in t["detail"]
        )
        lines.append(f"| {t['target']} | {t['met']}/{t['cases']} | {_fmt(t['worst'], '.2f', 'x')} | {per} |")
    lines += [
        "",
        "## Results",
        "",
        "| family | kernel | N x K | M | dtype | us | dense us | speedup | limit | of limit | GB/s "
        "| of copy BW | rel err | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        status = r.status if not r.note else f"{r.status}: {r.note}"
        status = status.replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r.family} | {r.kernel} | {r.n}x{r.k} | {r.m} | {r.dtype} | {_fmt(r.us, '.1f')} | "
            f"{_fmt(r.dense_us, '.1f')} | {_fmt(r.speedup, '.2f', 'x')} | {_fmt(r.limit, '.2f', 'x')} | "
            f"{_fmt(r.of_limit and 100 * r.of_limit, '.0f', '%')} | {_fmt(r.gbps, '.0f')} | "
            f"{_fmt(r.of_copy and 100 * r.of_copy, '.0f', '%')} | {_fmt(r.rel_err, '.1e')} | {status} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: Path, command: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "gpu_suite.md", out_dir / "gpu_suite.json"
    report.targets = evaluate_targets(report.results)
    md.write_text(render_markdown(report, command))
    payload = asdict(report)
    payload["command"] = command
    js.write_text(json.dumps(payload, indent=1, default=str))
    return md, js


def plan(shapes, ms, dtypes) -> list[tuple[str, str, int, int, int, str]]:
    """(family, kernel, n, k, m, dtype) of every case, in run order."""
    cases = []
    for dtype in dtypes:
        for n, k in shapes:
            for m in ms:
                decode = m <= 16
                cases += [("act_sparse", "triton", n, k, m, dtype)]
                if decode:
                    cases += [("act_sparse", "cuda", n, k, m, dtype)]
                cases += [("2:4", "triton", n, k, m, dtype)]
                if decode:
                    cases += [("2:4", "cuda", n, k, m, dtype)]
                cases += [("2:4", "torch 2:4", n, k, m, dtype)]
                cases += [("bsr64", "triton", n, k, m, dtype), ("bsr64", "torch bsr", n, k, m, dtype)]
                if decode:
                    cases += [("bitmask", "triton", n, k, m, dtype)]
    return cases


def parse_shapes(text: str):
    return tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))


# ---- steps run in subprocesses --------------------------------------------------------------------
def run_step(cmd: list[str], timeout: float, env=None, log: Path | None = None) -> dict:
    start = time.time()
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout),
            env={**os.environ, **(env or {})},
        )
        output, status = (
            proc.stdout + proc.stderr,
            "ok" if proc.returncode == 0 else f"failed (rc={proc.returncode})",
        )
    except subprocess.TimeoutExpired as e:
        output = (
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        )
        status = f"timed out after {timeout:.0f} s"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(" ".join(cmd) + "\n\n" + output)
    return dict(status=status, seconds=time.time() - start, output=output)


def pytest_summary(output: str) -> str:
    summary = r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected)\b.*?) in [\d.]+s"
    found = re.findall(summary, output, re.M)
    if found:
        return found[-1]
    tail = [ln for ln in output.strip().splitlines() if ln.strip()][-3:]
    return " / ".join(tail)


# ---- benchmark (this process must hold the freshly built extension) -------------------------------
class Bench:
    def __init__(self, deadline: float, reps_ms: float = 25.0, rounds: int = 5):
        import torch

        self.torch = torch
        self.deadline = deadline
        self.reps_ms = reps_ms
        self.rounds = rounds
        props = torch.cuda.get_device_properties(0)
        self.l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20

    def copies_for(self, weight_bytes: int, decode: bool) -> int:
        """Enough weight copies that one pass over them overflows L2 three times (decode only)."""
        if not decode:
            return 1
        return int(max(1, min(8, math.ceil(3 * self.l2_bytes / max(1, weight_bytes)))))

    def time_left(self) -> float:
        return self.deadline - time.time()

    def capture(self, fns):
        """A CUDA graph of `calls` calls cycling through fns, or None when capture fails (eager then)."""
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for f in fns:
            f()  # warm-up: Triton autotuning / compilation, cuSPARSELt plans, caches
        torch.cuda.synchronize()
        start.record()
        for i in range(10):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        est_ms = max(start.elapsed_time(end) / 10, 1e-3)
        calls = int(max(len(fns), min(2000, self.reps_ms / est_ms)))
        calls = max(len(fns), calls - calls % len(fns))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                with torch.cuda.graph(graph, stream=side):
                    for i in range(calls):
                        fns[i % len(fns)]()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            return ("graph", graph, calls)
        except Exception as e:  # noqa: BLE001 - some torch sparse paths cannot be captured
            torch.cuda.synchronize()
            return ("eager", None, calls, f"graph capture failed ({type(e).__name__}); eager timing")

    def replay_us(self, captured, fns) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        mode, graph, calls = captured[:3]
        start.record()
        if mode == "graph":
            graph.replay()
        else:
            for i in range(calls):
                fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / calls

    def compare(self, dense_fns, kernel_fns) -> tuple[float, float, str]:
        """Median us of dense and kernel, measured interleaved."""
        cd, ck = self.capture(dense_fns), self.capture(kernel_fns)
        td, tk = [], []
        for _ in range(self.rounds):
            td.append(self.replay_us(cd, dense_fns))
            tk.append(self.replay_us(ck, kernel_fns))
        note = ck[3] if len(ck) > 3 else ""
        return statistics.median(td), statistics.median(tk), note

    def copy_bandwidth(self) -> float:
        torch = self.torch
        a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.copy_(a)
        times = []
        for _ in range(5):
            start.record()
            b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return 2 * a.numel() / statistics.median(times) / 1e9


class Skip(Exception):
    """A case that cannot run on this machine (its backend is not built or not installed)."""


def clone_format(w):
    return type(w).from_tensors(
        tuple(w.shape), {k: t.clone() for k, t in w.tensors().items()}, validate=False, **w.params()
    )


def make_weights(torch, sf, n: int, k: int, dt, gen, device="cuda") -> dict:
    """One dense weight of the shape and its sparse variants (dense views kept for the baselines)."""
    dense = torch.randn(n, k, device=device, generator=gen, dtype=torch.float32).to(dt)
    bm, bk = BSR_BLOCK
    keep = torch.rand(-(-n // bm), -(-k // bk), device=device, generator=gen) >= BSR_SPARSITY
    keep[0, 0] = True  # at least one stored block
    w_bsr = dense * keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
    w_bm = dense * (torch.rand(n, k, device=device, generator=gen) < BITMASK_DENSITY)
    nm24 = sf.NM.from_dense(dense, 2, 4, prune=True)
    return dict(
        dense=dense,
        w24=nm24.to_dense(),
        nm24=nm24,
        w_bsr=w_bsr,
        bsr=sf.BSR.from_dense(w_bsr, BSR_BLOCK),
        w_bm=w_bm,
        bitmask=sf.Bitmask.from_dense(w_bm),
    )


def build_case(family: str, kernel: str, x, w: dict, copies):
    """(kernel calls cycling through weight copies, the dense weight it equals, float32 reference,
    bytes of weight the kernel reads, note). `copies(nbytes)` says how many weight copies to use."""
    import torch
    import torch.nn.functional as F

    from sparseflow.ops import gpu
    from sparseflow.ops.reference import act_sparse_mask

    note = ""
    if kernel == "cuda" and not gpu.cuda_ext_ready():
        raise Skip("CUDA C++ kernels not built into _C (SPARSEFLOW_CUDA=ON plus the binding hook)")
    if kernel == "triton" and not gpu.triton_ready():
        raise Skip("Triton not installed")
    if family == "act_sparse":
        flat = x.float().abs().flatten()[: 2**24]  # quantile's input limit
        threshold = gpu.rounded_threshold(float(flat.quantile(ACT_SPARSITY)), x.dtype)
        active = act_sparse_mask(x, threshold)
        w_dense = w["dense"]
        w_t = w_dense.t().contiguous()
        w_ts = [w_t] + [w_t.clone() for _ in range(copies(w_t.numel() * w_t.element_size()) - 1)]
        fn = gpu.triton_act_sparse_dense if kernel == "triton" else gpu.cuda_act_sparse_dense
        calls = [lambda wt=wt: fn(x, wt, threshold, None) for wt in w_ts]
        ref = torch.where(active, x, torch.zeros((), dtype=x.dtype, device=x.device)).float() @ w_t.float()
        read = active.any(0).float().mean().item() * w_t.numel() * w_t.element_size()
        note = f"active inputs {active.float().mean().item():.0%}, weight rows read {read / w_t.nbytes:.0%}"
        return calls, w_dense, ref, read, note
    fmt = {"2:4": "nm24", "bsr64": "bsr", "bitmask": "bitmask"}[family]
    w_dense = w[{"2:4": "w24", "bsr64": "w_bsr", "bitmask": "w_bm"}[family]]
    sparse = w[fmt]
    read = sparse.nbytes
    fmts = [sparse] + [clone_format(sparse) for _ in range(copies(read) - 1)]
    if kernel == "torch 2:4":
        semi = [gpu.semi_structured_weight(f) for f in fmts]
        calls = [lambda s=s: F.linear(x, s) for s in semi]
        backend = type(semi[0]).__name__.replace("SparseSemiStructuredTensor", "")
        note = f"{backend}; torch's kernel alone (the table row adds an eager NaN/inf check of x)"
    elif kernel == "torch bsr":
        calls, note = torch_bsr_fns(torch, F, w_dense, x, len(fmts))
    else:
        fn = {
            ("2:4", "triton"): gpu.triton_nm_linear,
            ("2:4", "cuda"): gpu.cuda_nm24_linear,
            ("bsr64", "triton"): gpu.triton_bsr_linear,
            ("bitmask", "triton"): gpu.triton_bitmask_linear,
        }[(family, kernel)]
        calls = [lambda f=f: fn(x, f, None) for f in fmts]
    return calls, w_dense, x.float() @ w_dense.float().t(), read, note


def run_case(bench: Bench, res: Result, x, w: dict, copy_gbps: float | None) -> None:
    import torch
    import torch.nn.functional as F

    decode = res.m <= 16
    copies = lambda nbytes: bench.copies_for(nbytes, decode)
    calls, w_dense, ref, read, note = build_case(res.family, res.kernel, x, w, copies)
    dense_ws = [w_dense] + [w_dense.clone() for _ in range(copies(w_dense.nbytes) - 1)]
    dense_calls = [lambda wd=wd: F.linear(x, wd) for wd in dense_ws]
    y = calls[0]()
    torch.cuda.synchronize()
    res.rel_err = (y.float() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
    res.dense_us, res.us, timing_note = bench.compare(dense_calls, calls)
    res.note = "; ".join(v for v in (note, timing_note) if v)
    res.speedup = res.dense_us / res.us
    if decode:
        es = x.element_size()
        res.limit = w_dense.nbytes / read
        res.of_limit = res.speedup / res.limit
        res.gbps = (read + x.numel() * es + res.m * res.n * es) / (res.us * 1e-6) / 1e9
        res.of_copy = res.gbps / copy_gbps if copy_gbps else None
    if not res.rel_err <= (1e-4 if x.dtype == torch.float32 else 2e-2):
        res.status = "mismatch"


def run_bench(args, deadline: float, checkpoint=None) -> Report:
    """Every case of the plan; `checkpoint(report)` after each one, so a killed run keeps its results."""
    import torch

    import sparseflow as sf
    from sparseflow._ext import _C

    report = Report()
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report.machine = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        gpu=props.name,
        sm_count=props.multi_processor_count,
        l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        cuda_ext=bool(getattr(_C, "cuda_built", lambda: False)()),
        host=platform.node(),
        python=sys.version.split()[0],
    )
    bench = Bench(deadline, reps_ms=args.reps_ms, rounds=args.rounds)
    report.copy_gbps = bench.copy_bandwidth()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights: dict = {}  # the current (n, k, dtype) only: shapes change rarely in plan order

    for family, kernel, n, k, m, dtname in plan(args.shapes, args.ms, args.dtypes):
        res = Result(family, kernel, n, k, m, dtname)
        report.results.append(res)
        if bench.time_left() < 5:
            res.status, res.note = "skipped", "time budget"
            continue
        try:
            dt = dtypes[dtname]
            if (n, k, dt) not in weights:
                weights.clear()
                torch.cuda.empty_cache()
                weights[(n, k, dt)] = make_weights(torch, sf, n, k, dt, gen)
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.float32).to(dt)
            run_case(bench, res, x, weights[(n, k, dt)], report.copy_gbps)
        except Skip as e:
            res.status, res.note = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - every case reports its own failure
            first = str(e).splitlines()[0][:140] if str(e) else ""
            res.status, res.note = "error", f"{type(e).__name__}: {first}"
            if args.verbose:
                traceback.print_exc()
        print(
            f"{family:10s} {kernel:10s} {n}x{k} m={m:<5d} {dtname}: {res.status} us={_fmt(res.us, '.1f')} "
            f"dense={_fmt(res.dense_us, '.1f')} x{_fmt(res.speedup, '.2f')} {res.note}",
            flush=True,
        )
        if checkpoint is not None:
            checkpoint(report)
    return report


def torch_bsr_fns(torch, F, w_dense, x, reps):
    """torch's BSR (to_sparse_bsr) applied to x, in the first form torch accepts for this dtype."""
    import warnings

    block = BSR_BLOCK
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR tensor support is in beta"
        mats = [w_dense.to_sparse_bsr(block)]
        mats += [w_dense.clone().to_sparse_bsr(block) for _ in range(reps - 1)]
    forms = [("F.linear(x, W_bsr)", lambda W: F.linear(x, W)), ("(W_bsr @ x.T).T", lambda W: (W @ x.t()).t())]
    errors = []
    for name, form in forms:
        try:
            form(mats[0])
            torch.cuda.synchronize()
            return [lambda W=W, form=form: form(W) for W in mats], name
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}")
    raise RuntimeError("torch BSR matmul unavailable: " + "; ".join(errors))


# ---- orchestration ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="directory for gpu_suite.md, gpu_suite.json and step logs (default: benchmarks/results)",
    )
    parser.add_argument("--skip-build", action="store_true", help="use the installed extension as it is")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    parser.add_argument("--bench-only", action="store_true", help="only benchmark, in this process")
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: list the cases, render a placeholder report"
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES),
        help="N x K of the weights, comma separated (default: %(default)s)",
    )
    parser.add_argument(
        "--ms",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=DEFAULT_MS,
        help="rows of x, comma separated (default: 1,2048)",
    )
    parser.add_argument(
        "--dtypes",
        type=lambda s: tuple(s.split(",")),
        default=DEFAULT_DTYPES,
        help="fp16,bf16[,fp32] (default: fp16,bf16)",
    )
    parser.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole run")
    parser.add_argument("--build-timeout-s", type=float, default=240.0)
    parser.add_argument("--tests-timeout-s", type=float, default=240.0)
    parser.add_argument("--reps-ms", type=float, default=25.0, help="GPU time per graph replay")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved dense/kernel replays per case")
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps-json", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    start = time.time()
    deadline = args.deadline or start + args.budget_s

    if args.dry_run:
        cases = plan(args.shapes, args.ms, args.dtypes)
        report = Report(machine=dict(date=_dt.datetime.now().isoformat(timespec="seconds"), gpu="(dry run)"))
        report.steps = {
            "build": dict(status="dry run"),
            "tests": dict(status="dry run"),
            "bench": dict(status="dry run", detail=f"{len(cases)} cases"),
        }
        for family, kernel, n, k, m, dtname in cases:
            report.results.append(Result(family, kernel, n, k, m, dtname, status="skipped", note="dry run"))
        md, js = write_report(report, args.out, command)
        print("\n".join(f"{c[0]:10s} {c[1]:10s} {c[2]}x{c[3]} m={c[4]} {c[5]}" for c in cases))
        print(f"{len(cases)} cases; wrote {md} and {js}")
        return 0

    if args.bench_only:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing to benchmark (try --dry-run)", file=sys.stderr)
            return 2
        steps = {}
        if args.steps_json is not None and args.steps_json.exists():
            steps = json.loads(args.steps_json.read_text())

        def checkpoint(partial: Report) -> None:
            running = dict(status="running (partial results)", seconds=time.time() - start)
            partial.steps = {**steps, "bench": running}
            write_report(partial, args.out, command)

        report = run_bench(args, deadline, checkpoint)
        report.steps = dict(steps)
        report.steps["bench"] = dict(
            status="ok",
            seconds=time.time() - start,
            detail=f"{sum(r.status == 'ok' for r in report.results)}/{len(report.results)} ok",
        )
        md, js = write_report(report, args.out, command)
        print(f"wrote {md} and {js}")
        return 0

    # 1. build, 2. tests, 3. bench: each in its own process
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {}
    if not args.skip_build:
        budget = min(args.build_timeout_s, deadline - time.time() - 240)
        r = run_step(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-build-isolation",
                "--no-deps",
                "-e",
                ".",
                "-Ccmake.define.SPARSEFLOW_CUDA=ON",
            ],
            budget,
            log=args.out / "build.log",
        )
        last = (r["output"].strip().splitlines() or [""])[-1]
        steps["build"] = dict(
            status=r["status"],
            seconds=r["seconds"],
            detail="log: build.log" if r["status"] == "ok" else f"{last} (build.log)",
        )
        print(f"build: {steps['build']['status']} ({r['seconds']:.0f} s)", flush=True)
    if not args.skip_tests:
        budget = min(args.tests_timeout_s, deadline - time.time() - 200)
        # pytest-xdist, where installed, spreads the Triton compiles over the cores (one GPU is shared).
        xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []
        r = run_step(
            [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
             *xdist],
            budget,
            env={"SPARSEFLOW_TRITON_AUTOTUNE": "0"},
            log=args.out / "tests.log",
        )
        steps["tests"] = dict(status=r["status"], seconds=r["seconds"], detail=pytest_summary(r["output"]))
        print(
            f"tests: {steps['tests']['status']}: {steps['tests']['detail']} ({r['seconds']:.0f} s)",
            flush=True,
        )
    steps_json = args.out / "steps.json"
    steps_json.write_text(json.dumps(steps, indent=1))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--bench-only",
        "--out",
        str(args.out),
        "--steps-json",
        str(steps_json),
        "--shapes",
        ",".join(f"{n}x{k}" for n, k in args.shapes),
        "--ms",
        ",".join(map(str, args.ms)),
        "--dtypes",
        ",".join(args.dtypes),
        "--reps-ms",
        str(args.reps_ms),
        "--rounds",
        str(args.rounds),
        "--deadline",
        str(deadline - 10),
    ]
    if args.verbose:
        cmd.append("--verbose")
    bench_start = time.time()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=max(30.0, deadline - time.time())).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc != 0:
        # The bench process died: keep the results it checkpointed, and say so.
        report = Report(steps=steps)
        try:
            data = json.loads((args.out / "gpu_suite.json").read_text())
            if data.get("steps", {}).get("bench", {}).get("status", "").startswith("running"):
                report.machine, report.copy_gbps = data.get("machine", {}), data.get("copy_gbps")
                report.results = [Result(**r) for r in data.get("results", [])]
        except (OSError, ValueError, TypeError):
            pass
        steps["bench"] = dict(status=f"failed ({rc})", seconds=time.time() - bench_start,
                              detail=f"{len(report.results)} cases reported before it stopped")
        write_report(report, args.out, command)
        return 1
    print(f"done in {time.time() - start:.0f} s: {args.out / 'gpu_suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
