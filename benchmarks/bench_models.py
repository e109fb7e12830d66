"""Decode and prefill speed of a Llama-shaped decoder (random weights, bf16) through sparseflow:
dense, 2:4, 50% unstructured, 50% activation-sparse, and 50% weight + 50% activation together.

    python benchmarks/bench_models.py [--hidden 2048 --intermediate 8192 --layers 4] [--json PATH]

Decode is timed as one new token with a KV cache of `--context` tokens (median of interleaved
steps), for one sequence and for each batch of `--decode-batch` sequences decoded together (a
server's batch: as many rows of x per layer); prefill as one forward over `--prefill` tokens.
Every variant's logits are first checked against a float64 plain-torch reference of itself
(bench.model.check_outputs: masked dense weights, thresholded inputs), by the 2x idiom."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform

import torch

import sparseflow as sf
from sparseflow.bench.model import check_outputs, decode_step_fn, median_interleaved
from sparseflow.io._atomic import write_result
from sparseflow.models import llama


def prune_linears(model, pattern):
    """Magnitude-prunes every Linear but lm_head to 50% (unstructured) or 2:4."""
    sf.prune(model, method="magnitude", sparsity=0.5, pattern=pattern, progress=False)


M_RANGE = (1, 16, 128)  # decode, small batch, prefill: above the last win a layer decompresses and runs dense


def variants(base, calibration, prefill="batched"):
    out = {"dense": base}
    m = copy.deepcopy(base)
    prune_linears(m, "2:4")
    sf.sparsify(m, format="2:4", m_range=M_RANGE, prefill=prefill)
    out["2:4"] = m
    m = copy.deepcopy(base)
    prune_linears(m, "unstructured")
    sf.sparsify(m, format="bitmask", m_range=M_RANGE, prefill=prefill)
    out["unstructured 50%"] = m
    m = copy.deepcopy(base)
    sf.sparsify(m, activation_sparsity=0.5, calibration=calibration, m_range=M_RANGE, prefill=prefill)
    out["activation 50%"] = m
    m = copy.deepcopy(base)
    prune_linears(m, "unstructured")
    sf.sparsify(m, activation_sparsity=0.5, calibration=calibration, m_range=M_RANGE, prefill=prefill)
    out["weight 50% + activation 50%"] = m
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--decode-batch", type=int, nargs="*", default=[4, 8, 16],
                   help="batches of sequences also decoded together (default: %(default)s)")
    p.add_argument("--prefill-path", choices=["batched", "auto", "dense"], default="batched",
                   help="sf.sparsify(prefill=...): what runs above a layer's crossover (default: %(default)s)")
    p.add_argument("--json", default="benchmarks/results/models.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = llama(args.hidden, args.intermediate, args.layers, vocab=args.vocab)
    ids = torch.randint(0, args.vocab, (1, args.context))
    calibration = [torch.randint(0, args.vocab, (1, 32)) for _ in range(4)]
    models = variants(base, calibration, args.prefill_path)
    checks = {k: check_outputs(m, torch.randint(0, args.vocab, (1, 16))) for k, m in models.items() if k != "dense"}
    for k, c in checks.items():
        print(f"{k}: logits within {c['rel_err']:.2e} of the float64 reference (bf16 reference: "
              f"{c['dense_rel_err']:.2e}){'' if c['ok'] else '  WRONG'}")
    if not all(c["ok"] for c in checks.values()):
        raise SystemExit("a variant does not match its reference: not timed")
    decode = median_interleaved({k: decode_step_fn(m, ids) for k, m in models.items()}, args.rounds)
    batched = {b: median_interleaved({k: decode_step_fn(m, torch.randint(0, args.vocab, (b, args.context)))
                                      for k, m in models.items()}, args.rounds) for b in args.decode_batch}
    prompt = torch.randint(0, args.vocab, (1, args.prefill))

    def prefill(m):
        def run():
            with torch.no_grad():
                m(prompt)
        return run

    pre = median_interleaved({k: prefill(m) for k, m in models.items()}, args.rounds)
    info = sf.info()
    mb = {k: sum(t.numel() * t.element_size() for t in [*m.buffers(), *m.parameters()]) / 2**20
          for k, m in models.items()}  # resident weights, dense copies included
    rows = [{"variant": k, "decode_ms": decode[k] * 1e3, "decode_tok_s": 1 / decode[k],
             "decode_speedup": decode["dense"] / decode[k],
             **{f"decode_b{b}_tok_s": b / t[k] for b, t in batched.items()},
             **{f"decode_b{b}_speedup": t["dense"] / t[k] for b, t in batched.items()}, "prefill_ms": pre[k] * 1e3,
             "prefill_speedup": pre["dense"] / pre[k], "resident_mb": mb[k],
             "logits_rel_err": checks[k]["rel_err"] if k in checks else None} for k in models]
    print(f"Llama-shaped decoder: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"bf16, {info['threads']} threads, {info['cpu']} ({info['isa_in_use']}), context {args.context}, "
          f"prefill path {args.prefill_path}")
    print(f"{'variant':<30}{'decode ms':>10}{'tok/s':>8}{'speedup':>9}"
          + "".join(f"{f'batch {b} tok/s':>15}{'speedup':>9}" for b in batched)
          + f"{'prefill ms':>12}{'speedup':>9}{'MB':>8}")
    for r in rows:
        print(f"{r['variant']:<30}{r['decode_ms']:>10.2f}{r['decode_tok_s']:>8.1f}{r['decode_speedup']:>8.2f}x"
              + "".join(f"{r[f'decode_b{b}_tok_s']:>15.1f}{r[f'decode_b{b}_speedup']:>8.2f}x" for b in batched)
              + f"{r['prefill_ms']:>12.1f}{r['prefill_speedup']:>8.2f}x{r['resident_mb']:>8.0f}")
    result = {"date": datetime.date.today().isoformat(), "machine": info, "python": platform.python_version(),
              "args": vars(args), "rows": rows}
    if args.json:
        write_result(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
