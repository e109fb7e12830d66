"""Proof on a real model: MiniLM-L6 (trained weights, offline), pruned 2:4 and 50% unstructured,
sparsified: outputs match the masked-dense model within the 2x idiom, compiled and eager agree,
and save_pretrained / from_pretrained round-trips bit-exact."""

import copy

import pytest
import torch
from conftest import assert_close_2x
from torch import nn

import sparseflow as sf

models = pytest.importorskip("sparseflow.models")
SENTENCES = ["Sparse kernels make decoding faster.", "The cat sat on the mat.", "A quick brown fox jumps."]


@pytest.fixture(scope="module")
def minilm():
    try:
        return models.load_minilm()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def magnitude_prune(model, pattern):
    """sf.prune by |W| per layer: every encoder Linear (the pooler is a head, left dense) at 50%."""
    report = sf.prune(model, method="magnitude", sparsity=0.5, pattern=pattern)
    assert len(report) == 36 and not any("pooler" in r.name for r in report)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            zeros = (mod.weight == 0).float().mean().item()
            assert zeros == 0 if "pooler" in name else abs(zeros - 0.5) < 1e-3, (name, zeros)


@pytest.mark.parametrize("pattern,format", [("2:4", "2:4"), ("unstructured", "bitmask")])
def test_minilm_sparsified_matches_masked_dense(minilm, tmp_path, pattern, format):
    model, tok = minilm
    masked = copy.deepcopy(model)
    magnitude_prune(masked, pattern)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref64 = copy.deepcopy(masked).double()(**batch).last_hidden_state
        dense = masked(**batch).last_hidden_state
    sparse = copy.deepcopy(masked)
    report = sf.sparsify(sparse, format=format, exclude=["pooler.*"])
    assert len(report.layers) == 36 and all(r.choice == format for r in report.layers)
    with torch.no_grad():
        y = sparse(**batch).last_hidden_state
        assert_close_2x(y, ref64, dense)
        compiled = torch.compile(sparse, fullgraph=True)
        yc = compiled(**batch).last_hidden_state
    assert_close_2x(yc, ref64, dense)  # compiled and eager agree to within the same bound
    assert (yc - y).abs().max() < 1e-3
    sf.save_pretrained(sparse, tmp_path)
    loaded = sf.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, y)
    emb = models.embed(sparse, tok, SENTENCES)
    emb_dense = models.embed(model, tok, SENTENCES)
    assert (emb * emb_dense).sum(-1).mean() > 0.5  # still a sentence encoder after one-shot magnitude pruning
