"""Model-level timing: one decode step (one new token against a KV cache) and one prefill, for
several variants of a model, interleaved. Used by benchmarks/bench_models.py and by
`sparseflow bench model DIR` (a saved sparse model against its own dense equivalent)."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .timing import compare


def decode_step_fn(model: nn.Module, context_ids: torch.Tensor) -> Callable[[], None]:
    """A callable that decodes one token after `context_ids` (the cache is cut back after each step)."""
    from transformers import DynamicCache

    from ..models import cache_keyword

    cache, kw = DynamicCache(), cache_keyword(model)
    with torch.no_grad():
        model(context_ids, use_cache=True, **{kw: cache})
    token = context_ids[:, -1:]

    def step():
        with torch.no_grad():
            model(token, use_cache=True, **{kw: cache})
        cache.crop(-1)

    return step


def encode_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            model(ids)

    return run


def median_interleaved(fns: dict[str, Callable[[], None]], rounds: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each callable, one turn (`inner` calls) of each per round, in a
    fresh order each round (a fixed order gives each callable its own position in the machine's
    rhythm), after one untimed round (bench.timing.compare)."""
    def turn(fn):
        def run():
            for _ in range(inner):
                fn()
        return run

    stats = compare({k: turn(fn) for k, fn in fns.items()}, warmup=1, reps=rounds)
    return {k: s.median / inner for k, s in stats.items()}


def densified(model: nn.Module) -> nn.Module:
    """A copy with every sparse layer replaced by the equivalent dense nn.Linear."""
    from ..nn import SparseLinear

    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, SparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, child, mod.to_linear())
    return dense


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from .. import model_io

    p = argparse.ArgumentParser(
        prog=prog,
        description="Decode and prefill time of a saved sparse model against "
        "its dense equivalent (same process, interleaved medians).",
    )
    p.add_argument("dir", help="a directory written by sf.save_pretrained or sf.save")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    directory = Path(args.dir)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if not (directory / model_io.DESCRIPTION).is_file():
        raise FileNotFoundError(f"{directory} is not a model saved by sparseflow (no {model_io.DESCRIPTION})")
    description = json.loads((directory / model_io.DESCRIPTION).read_text())
    if not description.get("transformers_class"):
        raise ValueError(f"{directory} is not a transformers model: bench model times token inputs, so it needs one "
                         "saved with sf.save_pretrained")
    model = model_io.from_pretrained(directory)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("bench model needs a transformers model with a vocabulary")
    variants = {"dense": densified(model), "sparse": model}
    ids = torch.randint(0, vocab, (1, args.context))
    prompt = torch.randint(0, vocab, (1, args.prefill))
    causal = hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")
    rows = {}
    if causal:
        rows["decode"] = median_interleaved({k: decode_step_fn(m, ids) for k, m in variants.items()}, args.rounds)
    rows["prefill" if causal else "encode"] = median_interleaved(
        {k: encode_fn(m, prompt) for k, m in variants.items()}, max(3, args.rounds // 2)
    )
    result = {
        phase: {
            "dense_ms": t["dense"] * 1e3,
            "sparse_ms": t["sparse"] * 1e3,
            "speedup": t["dense"] / t["sparse"],
        }
        for phase, t in rows.items()
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for phase, r in result.items():
            print(f"{phase:<8} dense {r['dense_ms']:8.2f} ms   sparse {r['sparse_ms']:8.2f} ms   {r['speedup']:.2f}x")
    return 0
