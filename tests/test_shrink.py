"""Structured pruning (neurons, heads) and sparseflow.prune.shrink: the shrunk model computes what the
pruned one did, transformers models still run, save and reload. Small random models; fast."""

import copy

import pytest
import torch
from torch import nn

from sparseflow.prune import find_attention, find_mlps, load_shrunk, prune, shrink
from sparseflow.prune.shrink import STRUCTURE_KEY

transformers = pytest.importorskip("transformers")

STRUCTURED = ["magnitude", "wanda", "variance", "sparsegpt"]


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(24, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)]
    return nn.Sequential(*layers).eval()


def calibration(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 24, generator=g) for _ in range(n)]


def tiny_bert(**kw):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=96, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert_batches(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 7:] = 0
        out.append({"input_ids": torch.randint(1, 120, (2, 12), generator=g), "attention_mask": mask})
    return out


def run(model, item):
    with torch.no_grad():
        out = model(**item) if isinstance(item, dict) else model(item)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def test_find_mlps_and_attention():
    assert [(u.ups, u.down) for u in find_mlps(mlp())] == [(["0"], "3"), (["3"], "5")]
    bert = find_mlps(tiny_bert())
    assert (bert[0].ups, bert[0].down) == (["encoder.layer.0.intermediate.dense"], "encoder.layer.0.output.dense")
    llama = find_mlps(tiny_llama())
    assert llama[0].ups == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    heads = find_attention(tiny_bert())
    assert len(heads) == 2 and heads[0].o == "encoder.layer.0.attention.output.dense"
    assert (heads[0].num_heads, heads[0].num_kv_heads, heads[0].head_dim) == (4, 4, 16)
    gqa = find_attention(tiny_llama())
    assert (gqa[0].num_heads, gqa[0].num_kv_heads, gqa[0].head_dim, gqa[0].group) == (8, 4, 8, 2)


@pytest.mark.parametrize("method", STRUCTURED)
def test_mlp_neurons_prune_then_shrink_is_exact(method):
    model = mlp()
    x = torch.randn(5, 24)
    report = prune(model, method, 0.25, "neurons", calibration=calibration())
    assert report["0"].note == "16/64 output neurons removed"
    assert report["3"].note.startswith("16/64 input neurons removed") and "12/48 output neurons" in report["3"].note
    assert [r.name for r in report] == ["0", "3", "5"]
    pruned = run(model, x)
    result = shrink(model)
    assert [(e.before, e.after) for e in result] == [(64, 48), (48, 36)]
    assert result.params_removed == sum(e.params_removed for e in result) > 0
    sizes = (model[0].out_features, model[3].in_features, model[3].out_features, model[5].in_features)
    assert sizes == (48, 48, 36, 36)
    assert torch.allclose(run(model, x), pruned, atol=1e-5)
    assert len(shrink(model)) == 0  # nothing left to remove


@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_criteria_cost_little_on_their_own_data(method):
    """Every criterion should beat removing random neurons on the calibration inputs' outputs."""
    model = mlp()
    cal = calibration(8)
    x = torch.cat(cal)
    dense = run(model, x)
    pruned = copy.deepcopy(model)
    prune(pruned, method, 0.5, "neurons", calibration=cal)
    err = (run(pruned, x) - dense).norm() / dense.norm()
    g = torch.Generator().manual_seed(3)
    random_errs = []
    for _ in range(5):
        rnd = copy.deepcopy(model)
        with torch.no_grad():
            for up, down in ((rnd[0], rnd[3]), (rnd[3], rnd[5])):
                drop = torch.randperm(up.out_features, generator=g)[: up.out_features // 2]
                up.weight[drop] = 0
                up.bias[drop] = 0
                down.weight[:, drop] = 0
        random_errs.append(float((run(rnd, x) - dense).norm() / dense.norm()))
    assert err < sum(random_errs) / len(random_errs)


def test_variance_folds_the_mean_of_constant_neurons():
    """Neurons whose output never varies are removed at no cost: their mean goes into the bias."""
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight[:8] = 0  # neurons 0..7 output tanh(bias): a constant
        model[0].bias[:8] = torch.linspace(-1, 1, 8)
    x = torch.randn(6, 24)
    dense = run(model, x)
    prune(model, "variance", 0.25, "neurons", calibration=calibration())
    assert (model[2].weight[:, :8] == 0).all()
    assert torch.allclose(run(model, x), dense, atol=1e-5)
    shrink(model)
    assert model[0].out_features == 24 and torch.allclose(run(model, x), dense, atol=1e-5)


def test_sparsegpt_refit_beats_plain_removal():
    cal = calibration(8)
    x = torch.cat(cal)
    dense_model = mlp()
    dense = run(dense_model, x)
    errs = {}
    for method in ("wanda", "sparsegpt"):  # the same neurons; sparsegpt also refits the down projection
        m = copy.deepcopy(dense_model)
        prune(m, method, 0.5, "neurons", calibration=cal)
        errs[method] = float((run(m, x) - dense).norm())
    assert errs["sparsegpt"] < errs["wanda"]


@pytest.mark.parametrize("pattern", ["neurons", "heads"])
@pytest.mark.parametrize("method", STRUCTURED)
def test_bert_prune_shrink_save_reload(method, pattern, tmp_path):
    model = tiny_bert()
    cal = bert_batches()
    prune(model, method, 0.5, pattern, calibration=cal)
    pruned = run(model, cal[0])
    report = shrink(model)
    assert len(report) == 2 and all(e.kind == pattern for e in report)
    if pattern == "heads":
        att = model.encoder.layer[0].attention.self
        assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 32, 32)
        assert model.encoder.layer[0].attention.output.dense.in_features == 32
    else:
        assert model.encoder.layer[0].intermediate.dense.out_features == 64
        assert model.config.intermediate_size == 64
    assert torch.allclose(run(model, cal[0]), pruned, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_shrunk(str(tmp_path))
    assert torch.allclose(run(reloaded, cal[0]), pruned, atol=1e-5)
    if pattern == "neurons":  # uniform widths are in the config: plain from_pretrained works too
        plain = transformers.BertModel.from_pretrained(tmp_path).eval()
        assert torch.allclose(run(plain, cal[0]), pruned, atol=1e-5)


def test_bert_eager_attention_and_uneven_heads(tmp_path):
    model = tiny_bert(attn_implementation="eager")
    cal = bert_batches()
    with torch.no_grad():  # layer 0 loses 3 heads, layer 1 one head
        model.encoder.layer[0].attention.output.dense.weight[:, :48] = 0
        model.encoder.layer[1].attention.output.dense.weight[:, 16:32] = 0
    before = run(model, cal[0])
    report = shrink(model)
    assert [(e.before, e.after) for e in report] == [(4, 1), (4, 3)]
    assert torch.allclose(run(model, cal[0]), before, atol=1e-5)
    assert getattr(model.config, STRUCTURE_KEY)["heads"] == {"encoder.layer.0.attention.self": [1, 1],
                                                             "encoder.layer.1.attention.self": [3, 3]}
    model.save_pretrained(tmp_path)
    assert torch.allclose(run(load_shrunk(str(tmp_path)), cal[0]), before, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "variance"])
@pytest.mark.parametrize("pattern", ["neurons", "heads"])
def test_llama_gqa_prune_shrink_save_reload(method, pattern, tmp_path):
    model = tiny_llama()
    cal = [torch.randint(0, 120, (2, 10)) for _ in range(3)]
    prune(model, method, 0.5, pattern, calibration=cal)
    pruned = run(model, cal[0])
    report = shrink(model)
    assert len(report) == 2
    attn = model.model.layers[0].self_attn
    if pattern == "heads":  # whole k/v groups go: 8 heads in 4 groups -> 4 heads in 2 groups
        assert [(e.before, e.after) for e in report] == [(8, 4), (8, 4)]
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (32, 16, 32)
        assert attn.num_key_value_groups == 2
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    else:
        assert model.model.layers[0].mlp.down_proj.in_features == 48 and model.config.intermediate_size == 48
    assert torch.allclose(run(model, cal[0]), pruned, atol=1e-4)
    with torch.no_grad():  # generation-style use: the KV cache has the new head count
        out = model.generate(cal[0][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    model.save_pretrained(tmp_path)
    assert torch.allclose(run(load_shrunk(str(tmp_path)), cal[0]), pruned, atol=1e-4)
    if method == "magnitude":  # sizes fit in the config (no bias was added): plain from_pretrained
        plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(run(plain, cal[0]), pruned, atol=1e-4)
    else:  # variance folded means into biases Llama's config has no room for
        assert getattr(model.config, STRUCTURE_KEY)["bias"]


def test_shrunk_bert_is_faster_or_at_least_smaller():
    model = tiny_bert()
    n_before = sum(p.numel() for p in model.parameters())
    prune(model, "magnitude", 0.5, "neurons")
    prune(model, "magnitude", 0.5, "heads")
    report = shrink(model)
    assert sum(p.numel() for p in model.parameters()) == n_before - report.params_removed
    assert report.params_removed > 0.2 * sum(p.numel() for n, p in model.named_parameters() if "encoder" in n)
    assert "params removed" in str(report) and report.to_markdown().startswith("| module")


def test_shrink_without_zeros_changes_nothing():
    model = tiny_bert()
    state = copy.deepcopy(model.state_dict())
    assert len(shrink(model)) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_structured_errors():
    with pytest.raises(ValueError, match="no MLP"):
        prune(nn.Sequential(nn.Linear(4, 4)), "magnitude", 0.5, "neurons")
    with pytest.raises(ValueError, match="no attention"):
        prune(mlp(), "magnitude", 0.5, "heads")
    with pytest.raises(ValueError, match="needs calibration"):
        prune(mlp(), "variance", 0.5, "neurons")


@pytest.mark.parametrize("arch,pattern,method", [("bert", "heads", "magnitude"), ("llama", "neurons", "sparsegpt"),
                                                 ("llama", "heads", "variance")])
def test_sparse_save_pretrained_of_a_shrunk_model_reloads_exactly(arch, pattern, method, tmp_path):
    """sf.from_pretrained built the model from its config alone: a size mismatch for removed heads,
    an unexpected key for an added bias. It now applies the recorded structure; load_shrunk reads
    sparseflow's directories too; the dense exports warn that other engines drop added biases."""
    import sparseflow as sf

    model = tiny_bert() if arch == "bert" else tiny_llama()
    cal = bert_batches() if arch == "bert" else [torch.randint(0, 120, (2, 10)) for _ in range(3)]
    prune(model, method, 0.5, pattern, calibration=cal, progress=False)
    sf.sparsify(model, measure=False)
    before = run(model, cal[0])
    sf.save_pretrained(model, tmp_path / "sparse")
    assert torch.equal(run(sf.from_pretrained(tmp_path / "sparse"), cal[0]), before)
    assert torch.equal(run(load_shrunk(str(tmp_path / "sparse")), cal[0]), before)
    added = getattr(model.config, STRUCTURE_KEY, {}).get("bias")
    if added:
        with pytest.warns(UserWarning, match="carry biases that .* has no place for"):
            sf.export_dense(model, tmp_path / "dense")
        assert torch.allclose(run(load_shrunk(str(tmp_path / "dense")), cal[0]), before, atol=1e-5)


class _NamedMLP(nn.Module):
    """fc1 -> `mid` -> fc2: found by the attribute names, whatever `mid` does."""

    def __init__(self, mid: nn.Module):
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(16, 32), mid, nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.mid(self.fc1(x)))


@pytest.mark.parametrize("mid, shrunk", [(nn.GELU(), True), (nn.LayerNorm(32), False), (nn.Softmax(-1), False)])
def test_an_mlp_that_may_mix_its_neurons_is_left_whole(mid, shrunk):
    """Removing a neuron whose down column is zero is exact only if each neuron stays on its own up
    to the down projection: a norm over the neurons or a softmax between mixes them."""
    torch.manual_seed(0)
    m = _NamedMLP(mid)
    with torch.no_grad():
        m.fc2.weight[:, :8] = 0
    x = torch.randn(4, 16)
    y = m(x)
    shrink(m)
    assert (m.fc1.out_features == 24) == shrunk
    torch.testing.assert_close(m(x), y)


def test_shrink_leaves_a_shared_config_to_the_other_models():
    """transformers keeps the caller's config object: two models built from one config shared it,
    and shrinking one rewrote the other's head count and MLP width (its save then failed to load)."""
    first = tiny_llama()
    second = transformers.LlamaForCausalLM(first.config).eval()
    cal = [torch.randint(0, 120, (2, 10)) for _ in range(2)]
    prune(first, "magnitude", 0.5, "heads", calibration=cal)
    prune(first, "magnitude", 0.5, "neurons", calibration=cal)
    shrink(first)
    assert (first.config.num_attention_heads, first.config.intermediate_size) == (4, 48)
    assert (second.config.num_attention_heads, second.config.intermediate_size) == (8, 96)
    assert not hasattr(second.config, STRUCTURE_KEY)
    assert all(m.config is first.config for m in first.modules() if hasattr(m, "config"))  # (one config per model)
    with torch.no_grad():
        assert run(second, cal[0]).shape == (2, 10, 120) and run(first, cal[0]).shape == (2, 10, 120)
