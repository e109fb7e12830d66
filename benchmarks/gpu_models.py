"""A Llama-shaped decoder on the GPU (random weights, bf16): dense against 2:4, 50% activation
sparsity, and 50% unstructured (bitmask), at decode and at prefill.

    python benchmarks/gpu_models.py [--hidden 4096 --intermediate 14336 --layers 8] [--json PATH]

Decode is one token through the whole model (no KV cache: at short contexts the linear layers'
weights are nearly all of the bytes a step reads), captured in a CUDA graph and replayed, so the
time is the GPU's and not Python's launches; it is also timed eagerly (synchronised), which is what
a plain PyTorch loop gets. Prefill is one eager forward over `--prefill` tokens. Layers are
sparsified with `cuda_graphs=True` (timed as graphs replay them; `--eager-dispatch` for eager
timing), activation-sparse ones kept only where faster. Variants are timed interleaved in one
process, median of `--rounds`; each weight-sparse variant is first checked against its masked
dense twin. Default shapes are Llama-3-8B's layers (GQA 32/8 heads)."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time

import torch
from torch import nn

import sparseflow as sf
from sparseflow.io._atomic import write_result


def build(args, device):
    import transformers

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def prune(model: nn.Module, pattern: str) -> None:
    """Magnitude pruning of every decoder Linear to 50%: 2 of each 4 along K, or unstructured per row."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
                continue
            w = mod.weight
            if pattern == "2:4":
                groups = w.abs().reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
                w.mul_(keep.reshape(w.shape))
            else:
                cut = w.abs().float().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
                w.mul_(w.abs().float() > cut)


def variants(base, calibration, with_bitmask: bool, m_range: tuple[int, ...], cuda_graphs: bool):
    """The model in each variant, sparsified as a user would (measured on this device at m_range),
    the masked dense twins of the weight-sparse ones, and each variant's sparsify report."""
    out, twins, reports = {"dense": base}, {}, {}
    patterns = [("2:4", "2:4")] + ([("unstructured 50%", "bitmask")] if with_bitmask else [])
    for label, fmt in patterns:
        twin = copy.deepcopy(base)
        prune(twin, "2:4" if fmt == "2:4" else "unstructured")
        m = copy.deepcopy(twin)
        reports[label] = sf.sparsify(m, format=fmt, m_range=m_range, cuda_graphs=cuda_graphs)
        out[label], twins[label] = m, twin
    m = copy.deepcopy(base)
    report = sf.sparsify(m, activation_sparsity=0.5, calibration=calibration, m_range=m_range,
                         cuda_graphs=cuda_graphs)
    kept = sum(r.choice.startswith("act-sparse") for r in report.layers)
    print(f"activation 50%: {kept} of {len(report.layers)} layers measured faster activation-sparse")
    out["activation 50%"], reports["activation 50%"] = m, report
    return out, twins, reports


def graphed(model, tok):
    """A replay function for one forward of `tok`, captured in a CUDA graph (None if capture fails)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(tok, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:  # on the stream that warmed up: the kernels' per-stream workspaces stay out of the graph
        with torch.no_grad(), torch.cuda.graph(graph, stream=side):
            model(tok, use_cache=False)
    except Exception as e:  # reported, and the eager timings stand alone
        print(f"  graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None
    return graph.replay


def timed(fns: dict, rounds: int, inner: int, sync) -> dict[str, float]:
    """Median seconds per call, the callables interleaved in a rotating order, `inner` calls per sample."""
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(rounds):
        names = list(fns)
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def write(result: dict, path: str | None) -> None:
    if path:
        write_result(path, json.dumps(result, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-bitmask", action="store_true", help="leave out the unstructured (bitmask) variant")
    p.add_argument("--eager-dispatch", action="store_true",
                   help="sparsify times layers eagerly (default: as CUDA graphs replay them, cuda_graphs=True)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (no graphs)")
    p.add_argument("--json", default="benchmarks/results/gpu_models.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base = build(args, device)
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, args.vocab, (1, 64), generator=gen).to(device) for _ in range(4)]
    models, twins, reports = variants(base, calibration, not args.no_bitmask, (1, args.prefill),
                                      not args.eager_dispatch)
    tok = torch.randint(0, args.vocab, (1, 1), generator=gen).to(device)
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=gen).to(device)

    errors = {}
    with torch.no_grad():
        for label, twin in twins.items():
            ref, got = twin(prompt[:, :16]).logits.float(), models[label](prompt[:, :16]).logits.float()
            errors[label] = ((got - ref).norm() / ref.norm()).item()
            print(f"{label}: relative error of the logits against the masked dense twin {errors[label]:.2e}")
            assert errors[label] < 2e-2, f"{label} does not match its masked dense twin"
        del twins

    def forward(m, ids):
        def run():
            with torch.no_grad():
                m(ids, use_cache=False)
        return run

    eager = timed({k: forward(m, tok) for k, m in models.items()}, args.rounds, 5, sync)
    prefill = timed({k: forward(m, prompt) for k, m in models.items()}, args.rounds, 1, sync)
    mb = {k: sum(t.numel() * t.element_size() for t in [*m.buffers(), *m.parameters()]) / 2**20
          for k, m in models.items()}
    rows = [{"variant": k, "decode_eager_ms": eager[k] * 1e3, "decode_eager_speedup": eager["dense"] / eager[k],
             "prefill_ms": prefill[k] * 1e3, "prefill_speedup": prefill["dense"] / prefill[k], "resident_mb": mb[k],
             "logits_rel_err": errors.get(k)} for k in models]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": gpu,
              "torch": torch.__version__, "sparseflow": sf.__version__, "args": vars(args), "rows": rows,
              "reports": {k: json.loads(r.to_json()) for k, r in reports.items()}}  # each layer's plan
    write(result, args.json)  # before the graphs: a failed capture can leave the device unusable
    if device.type == "cuda":
        replays = {k: graphed(m, tok) for k, m in models.items()}
        if all(replays.values()):
            graphs = timed(replays, args.rounds, 20, sync)
            for r in rows:
                r.update(decode_graph_ms=graphs[r["variant"]] * 1e3,
                         decode_graph_speedup=graphs["dense"] / graphs[r["variant"]])
            write(result, args.json)
    print(f"Llama-shaped decoder on {gpu}: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
          f"layers, heads {args.heads}/{args.kv_heads}, bf16, torch {torch.__version__}")
    print(f"{'variant':<20}{'graph ms':>10}{'x':>7}{'eager ms':>10}{'x':>7}{'prefill ms':>12}{'x':>7}{'MB':>8}")
    for r in rows:
        g = (f"{r['decode_graph_ms']:>10.3f}{r['decode_graph_speedup']:>6.2f}x" if "decode_graph_ms" in r
             else f"{'-':>10}{'-':>7}")
        print(f"{r['variant']:<20}{g}{r['decode_eager_ms']:>10.3f}{r['decode_eager_speedup']:>6.2f}x"
              f"{r['prefill_ms']:>12.2f}{r['prefill_speedup']:>6.2f}x{r['resident_mb']:>8.0f}")
    return result


if __name__ == "__main__":
    main()
