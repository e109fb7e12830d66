"""Model-level timing: one decode step (one new token against a KV cache) and one prefill, for
several variants of a model, interleaved. Used by benchmarks/bench_models.py and by
`sparseflow bench model DIR` (a saved sparse model against its own dense equivalent)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .._argtypes import positive_int
from ..model_io import densified
from .load import OtherLoad
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


class ActSparseReference(nn.Module):
    """ActSparseLinear in plain torch, in any dtype: the inputs (less the shift) at or under the
    threshold zeroed, then the dense product with the folded bias."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(act.to_linear().weight.detach().clone(), requires_grad=False)
        self.bias = None if act.bias is None else nn.Parameter(act.bias.detach().clone(), requires_grad=False)
        self.register_buffer("shift", None if act.shift is None else act.shift.detach().clone())
        self.threshold = act.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.reference import act_sparse_mask

        if self.shift is not None:
            x = x - self.shift
        x = torch.where(act_sparse_mask(x, self.threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.nn.functional.linear(x, self.weight, self.bias)


def reference(model: nn.Module) -> nn.Module:
    """A copy computing what the sparse model should, in plain torch: weight-sparse layers as dense
    nn.Linear with zeros, activation-sparse ones as ActSparseReference."""
    from ..nn import ActSparseLinear

    ref = densified(model)  # (activation-sparse layers become their unthresholded dense layer there)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ActSparseLinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, ActSparseReference(mod))
    return ref


def _output(out) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out if isinstance(out, torch.Tensor) else out[0]


def check_outputs(model: nn.Module, inputs: torch.Tensor) -> dict:
    """The model's output against a float64 plain-torch reference (`reference`), by the 2x idiom
    on the relative error (norm): within twice that of the reference run in the model's own dtype,
    plus 1e-3. {"ok", "rel_err", "dense_rel_err"}."""
    ref = reference(model)
    with torch.no_grad():
        ours = _output(model(inputs)).double()
        same_dtype = _output(ref(inputs)).double()
        ref64 = _output(ref.double()(inputs.double() if inputs.is_floating_point() else inputs))
    scale = ref64.norm().item() or 1.0
    err, base = (ours - ref64).norm().item() / scale, (same_dtype - ref64).norm().item() / scale
    return {"ok": bool(err <= 2 * base + 1e-3), "rel_err": err, "dense_rel_err": base}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from .. import model_io

    p = argparse.ArgumentParser(
        prog=prog,
        description="Decode and prefill time of a saved sparse model against "
        "its dense equivalent (same process, interleaved medians).",
    )
    p.add_argument("dir", help="a directory written by sf.save_pretrained or sf.save")
    p.add_argument("--context", type=positive_int, default=64)
    p.add_argument("--prefill", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    directory = Path(args.dir)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    if not (directory / model_io.DESCRIPTION).is_file():
        raise FileNotFoundError(f"{directory} is not a model saved by sparseflow (no {model_io.DESCRIPTION})")
    description = json.loads((directory / model_io.DESCRIPTION).read_text())
    if not isinstance(description, dict) or not description.get("transformers_class"):
        raise ValueError(f"{directory} is not a transformers model: bench model times token inputs, so it needs one "
                         "saved with sf.save_pretrained")
    model = model_io.from_pretrained(directory)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("bench model needs a transformers model with a vocabulary")
    learned = [m.num_embeddings for n, m in model.named_modules() if isinstance(m, nn.Embedding) and "position" in n]
    if learned and max(args.context + 1, args.prefill) > min(learned):  # (rotary positions have no such limit)
        raise ValueError(f"--context + 1 and --prefill must be at most the model's {min(learned)} learned "
                         f"positions, got {args.context} and {args.prefill}")
    variants = {"dense": densified(model), "sparse": model}
    ids = torch.randint(0, vocab, (1, args.context))
    prompt = torch.randint(0, vocab, (1, args.prefill))
    causal = hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")
    rows = {}
    others = OtherLoad()
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
    busy = others.cores()
    if busy is not None and busy > 0.1 * torch.get_num_threads():
        print(f"WARNING: other processes used {busy:.2f} cores on average while this ran on {torch.get_num_threads()} "
              "threads: they took cores from timed calls (dense torch suffers more), so these speedups are not "
              "this machine's; rerun on an idle machine", file=sys.stderr)
    if args.json:
        print(json.dumps({"phases": result, "other_cores": busy}, indent=1))
    else:
        for phase, r in result.items():
            print(f"{phase:<8} dense {r['dense_ms']:8.2f} ms   sparse {r['sparse_ms']:8.2f} ms   {r['speedup']:.2f}x")
    return 0
