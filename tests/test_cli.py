"""The command line: each subcommand runs, --json is JSON, user errors exit 2 with one line."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparseflow.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["isa_in_use"] in data["isa_available"]


def test_demo_quick_json(tmp_path, capsys):
    assert main(["demo", "--quick", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and all(r["correct"] for r in report["rows"])
    assert (tmp_path / "report.json").exists()


def test_user_errors_exit_2_with_one_line():
    r = run_cli("inspect", "/nonexistent/path")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = run_cli("convert", "/nonexistent/src", "/tmp/x", "--pattern", "3:3")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.fixture
def bad_inputs(tmp_path):
    """Paths for the error cases: an empty dir, a sparseflow model that is not a transformers one, a
    transformers config of a model type transformers does not know, a file that is not safetensors."""
    (tmp_path / "empty").mkdir()
    sf.save(nn.Sequential(nn.Linear(8, 8)), tmp_path / "plain")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "nosuchmodel", "architectures": ["NoSuch"]}')
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "damaged").mkdir()  # a transformers config beside weights that are not safetensors
    (tmp_path / "damaged" / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}))
    (tmp_path / "damaged" / "model.safetensors").write_text("garbage\n")
    return tmp_path


@pytest.mark.parametrize("argv,needle", [
    (["bench", "kernels", "--format", "3:3"], "got 3:3"),  # bad pattern: refused before any timing
    (["bench", "kernels", "--format", "bsr0x8"], "block sides must be positive"),
    (["bench", "kernels", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["bench", "model", "{tmp}/missing"], "does not exist"),
    (["bench", "model", "{tmp}/empty"], "not a model saved by sparseflow"),
    (["bench", "model", "{tmp}/plain"], "not a transformers model"),
    (["convert", "{tmp}/missing", "{tmp}/dst"], "no config.json"),
    (["convert", "{tmp}/missing", "{tmp}/dst", "--pattern", "3:3"], "pattern '3:3'"),
    (["convert", "{tmp}/missing", "{tmp}/dst", "--pattern", "2by4"], "unknown pattern '2by4'"),
    (["convert", "{tmp}/unknown", "{tmp}/dst", "--method", "magnitude"], "nosuchmodel"),
    (["convert", "{tmp}/damaged", "{tmp}/dst", "--method", "magnitude"], "cannot load the model's weights"),
    (["inspect", "{tmp}/missing"], "does not exist"),
    (["inspect", "{tmp}/notes.txt"], "not a valid safetensors file"),
    (["convert", "{tmp}/unknown", "{tmp}/dst", "--calibration", "{tmp}/nope.txt"], "--calibration"),  # (first)
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_convert_inspect_errors_exit_2_in_one_line(bad_inputs, capsys, argv, needle):
    if argv[0] == "convert" and ("unknown" in argv[1] or "damaged" in argv[1]):
        pytest.importorskip("transformers")
    assert main([a.format(tmp=bad_inputs) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and needle in err and err.startswith(f"sparseflow {argv[0]}: error: "), err
    assert captured.out == ""
    assert not (bad_inputs / "dst").exists()


def test_bench_kernels_json(tmp_path, capsys):
    args = ["bench", "kernels", "--shape", "128x256", "--format", "bitmask,2:4", "--sparsity", "0.5", "--dtype", "fp32",
            "--reps", "2", "--warmup", "1", "--max-seconds", "0.1", "--crossover-m", "", "--torch-csr", "none"]
    assert main([*args, "--json", "-"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is the JSON alone; the tables went to stderr
    assert [(r["kernel"], r["status"]) for r in report["results"]] == [("bitmask 50%", "ok"), ("2:4", "ok")]
    assert "Speedup over dense" in captured.err
    assert main([*args, "--json", str(tmp_path / "k.json")]) == 0
    assert len(json.loads((tmp_path / "k.json").read_text())["results"]) == 2


@pytest.mark.parametrize("argv,needle", [
    (["bench", "kernels", "--threads", "-1"], "--threads: expected an integer >= 0"),
    (["bench", "kernels", "--reps", "0"], "--reps: expected an integer >= 1"),
    (["bench", "kernels", "--m", "0"], "--m: expected an integer >= 1"),
    (["bench", "kernels", "--shape", "0x0"], "shape sides must be at least 1"),
    (["bench", "kernels", "--sparsity", "1.5"], "--sparsity: expected a fraction in [0, 1)"),
    (["bench", "kernels", "--act-sparsity", "-0.5"], "--act-sparsity: expected a fraction in [0, 1)"),
    (["bench", "kernels", "--max-seconds", "nan"], "--max-seconds: expected a number > 0"),
    (["bench", "model", "{tmp}", "--rounds", "0"], "--rounds: expected an integer >= 1"),
    (["serve", "{tmp}", "--threads", "-1"], "--threads: expected an integer >= 0"),
    (["serve", "{tmp}", "--queue-limit", "0"], "--queue-limit: expected an integer >= 1"),
    (["serve", "{tmp}", "--max-batch", "0"], "--max-batch: expected an integer >= 1"),
    (["convert", "{tmp}", "{tmp}/dst", "--sparsity", "2"], "--sparsity: expected a fraction in [0, 1)"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_out_of_range_options_are_usage_errors(tmp_path, capsys, argv, needle):
    """Refused by argparse (exit 2, one usage line) before anything runs, not a traceback or a
    misleading table later."""
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_bench_model_refuses_inputs_the_model_cannot_take(tmp_path, capsys):
    """A prompt longer than a model's learned position embeddings (BERT's) is refused up front;
    rotary models take any length."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=50, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    sf.sparsify(model, format="bitmask", measure=False)
    sf.save_pretrained(model, tmp_path)
    assert main(["bench", "model", str(tmp_path), "--prefill", "100"]) == 2
    assert "at most the model's 64 learned positions" in capsys.readouterr().err
    (tmp_path / "sparseflow.json").write_text("[]")
    assert main(["bench", "model", str(tmp_path)]) == 2
    assert "not a transformers model" in capsys.readouterr().err


def test_inspect_and_bench_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(config).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                mod.weight.copy_(sf.NM.from_dense(mod.weight, 2, 4, prune=True).to_dense())
    sf.sparsify(model, format="2:4")
    sf.save_pretrained(model, tmp_path)
    assert main(["inspect", str(tmp_path), "--no-measure", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    q = next(r for r in rows if r["name"].endswith("q_proj.weight"))
    assert q["pattern"] == "2:4" and q["format"] == "nm"
    assert main(["bench", "model", str(tmp_path), "--rounds", "2", "--context", "8", "--prefill", "8", "--json"]) == 0
    timing = json.loads(capsys.readouterr().out)
    assert set(timing) == {"phases", "other_cores"} and set(timing["phases"]) == {"decode", "prefill"}
    # dense weights written later into the same directory: the leftover sparseflow.json does not count
    sf.export_dense(model, tmp_path / "dense")
    (tmp_path / "dense" / "sparseflow.json").write_bytes((tmp_path / "sparseflow.json").read_bytes())
    assert main(["inspect", str(tmp_path / "dense"), "--no-measure", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert next(r for r in rows if r["name"].endswith("q_proj.weight"))["format"] == "dense"


def test_inspect_lists_every_kind_of_layer(tmp_path, capsys):
    """Activation-sparse layers and SparseLinear layers kept dense are listed with their [out, in]
    weight and stored bytes; the model.safetensors of an sf.save folder reads as the folder does."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(24, 32) < 0.5)
    model = nn.Sequential(sf.ActSparseLinear.from_linear(lin, 0.3, weight_format="bitmask"), nn.ReLU(),
                          sf.ActSparseLinear.from_linear(nn.Linear(24, 16), 0.2, shift=torch.randn(24)),
                          sf.SparseLinear.from_linear(nn.Linear(16, 8), "dense"))
    sf.save(model, tmp_path)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        assert main(["inspect", str(path), "--no-measure", "--json"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert set(rows) == {"0.weight", "2.weight", "3.weight"}
        assert rows["0.weight"]["format"] == "act-sparse(bitmask)" and rows["0.weight"]["shape"] == [24, 32]
        assert rows["0.weight"]["bytes"] < 24 * 32 * 4 and rows["0.weight"]["density"] <= 0.6
        assert rows["2.weight"]["format"] == "act-sparse(dense)" and rows["2.weight"]["bytes"] == 24 * 16 * 4
        assert rows["3.weight"]["format"] == "dense" and rows["3.weight"]["shape"] == [8, 16]


def test_convert_writes_a_loadable_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "magnitude",
                 "--pattern", "2:4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["choice"] for layer in report["layers"]] == ["2:4"] * 7
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("src", "dst")}
    assert size["dst"] < size["src"] - report["bytes_before"] // 4  # stored compressed (dense copies are not saved)
    model = sf.from_pretrained(tmp_path / "dst")
    assert sum(isinstance(m, sf.SparseLinear) for m in model.modules()) == 7
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2  # DST exists: refused


def test_convert_reads_a_model_sparseflow_saved_and_refuses_missing_weights(tmp_path, capsys):
    """A directory sf.save_pretrained wrote is rebuilt with its sparse layers and densified, not
    read by transformers (which found none of the pruned weights and started them from random
    values); any other source must hold every weight of its architecture."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "once"), "--method", "magnitude",
                 "--pattern", "2:4"]) == 0
    assert main(["convert", str(tmp_path / "once"), str(tmp_path / "twice"), "--method", "magnitude",
                 "--pattern", "2:4"]) == 0  # 2:4 again: the same weights
    capsys.readouterr()
    once, twice = (sf.model_io.dense_state_dict(sf.from_pretrained(tmp_path / d)) for d in ("once", "twice"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    weights = load_file(tmp_path / "src" / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "magnitude"]) == 2
    assert "lacks 1 of the model's weights (model.layers.0.mlp.up_proj.weight)" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_convert_calibrates_with_a_tokenizer_that_has_no_pad_token(tmp_path, capsys):
    """Llama, Mistral and GPT-2 tokenizers have no pad token: convert's default method (wanda)
    failed asking for one. It pads with eos (or unk); the attention mask keeps padding out."""
    transformers = pytest.importorskip("transformers")
    from sparseflow.models import minilm_path

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=30522)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "src")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "src").pad_token is None
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--json"]) == 0  # wanda, 2:4
    report = json.loads(capsys.readouterr().out)
    assert [layer["choice"] for layer in report["layers"]] == ["2:4"] * 7


@pytest.mark.parametrize("argv, needle", [
    (["--json", "{tmp}/blocker/x.json"], "--json {tmp}/blocker/x.json: cannot create"),
    (["--markdown", "{tmp}"], "--markdown {tmp}: is a directory"),
    (["--threads", "100000"], "--threads 100000: this process may run on"),
])
def test_bench_kernels_refuses_bad_outputs_and_threads_before_timing(tmp_path, capsys, argv, needle):
    """Found before the benchmark runs (a default run takes minutes), as one line naming the option."""
    (tmp_path / "blocker").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--quick", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert "ms sparse" not in err  # nothing was timed


def _tiny_llama_dir(path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_convert_refuses_options_it_would_ignore_and_fails_before_pruning(tmp_path, capsys, monkeypatch):
    import os

    from sparseflow import convert as convert_mod

    src = str(_tiny_llama_dir(tmp_path / "src"))
    for argv, needle in ((["--sparsity", "0.8"], "sparsity 0.8 conflicts with pattern 2:4"),  # (it pruned 50%)
                         (["--calibration", __file__], "magnitude pruning reads no inputs")):
        assert main(["convert", src, str(tmp_path / "dst"), "--method", "magnitude", *argv]) == 2
        assert needle in capsys.readouterr().err
    monkeypatch.setattr(convert_mod, "prune", lambda *a, **k: pytest.fail("pruned before the output was checked"))
    (tmp_path / "afile").write_text("")
    assert main(["convert", src, str(tmp_path / "afile" / "dst"), "--method", "magnitude"]) == 2
    monkeypatch.undo()

    def interrupted(*_args, **_kwargs):
        raise SystemExit(143)  # what SIGTERM raises under the CLI (as Ctrl-C, KeyboardInterrupt)

    monkeypatch.setattr(convert_mod.model_io, "save_pretrained", interrupted)
    with pytest.raises(SystemExit):
        main(["convert", src, str(tmp_path / "dst"), "--method", "magnitude"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]  # no hidden half-written copy
    monkeypatch.undo()
    assert main(["convert", src, str(tmp_path / "dst"), "--method", "magnitude", "--sparsity", "0.5"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "dst").stat().st_mode & 0o777 == 0o777 & ~umask  # (mkdtemp's 0700 kept others out)


def test_sigterm_and_ctrl_c_end_the_cli_in_one_line(capsys, monkeypatch):
    import signal

    from sparseflow import cli

    with pytest.raises(SystemExit) as e:
        cli._terminated(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(cli, "info", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "sparseflow info: interrupted"
    assert signal.getsignal(signal.SIGTERM) is not cli._terminated  # restored after the command


def test_demo_checks_its_output_before_running(tmp_path, capsys, monkeypatch):
    from sparseflow import demo

    monkeypatch.setattr(demo, "kernel_section", lambda *a: pytest.fail("ran before --out was checked"))
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--quick", "--out", str(tmp_path / "afile")]) == 2
    assert "afile" in capsys.readouterr().err


def test_inspect_reads_sharded_checkpoints_and_lists_unsupported_dtypes(tmp_path, capsys):
    from safetensors.torch import save_file

    transformers = pytest.importorskip("transformers")
    src = _tiny_llama_dir(tmp_path / "src")
    transformers.AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert main(["inspect", str(tmp_path / "sharded"), "--no-measure", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len([r for r in rows if r["name"].endswith("proj.weight")]) == 7
    save_file({"a.weight": torch.randn(8, 8, dtype=torch.float64), "b.weight": torch.randn(8, 8)},
              tmp_path / "mixed.safetensors")
    assert main(["inspect", str(tmp_path / "mixed.safetensors"), "--no-measure", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["a.weight"]["pattern"] == "unsupported dtype" and rows["b.weight"]["pattern"] == "dense"
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text("[]")
    assert main(["inspect", str(tmp_path / "badcfg")]) == 2
    assert "not a JSON object" in capsys.readouterr().err
