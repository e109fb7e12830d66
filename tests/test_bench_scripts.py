"""The benchmark scripts of benchmarks/ run end to end on tiny shapes (their numbers are not checked:
speed belongs to benchmarks, not tests), each checking its variants' outputs on the way, and write
their JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path / "cache"))


def test_bench_models_checks_and_times_every_variant(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "models.json"
    script("bench_models").main(["--hidden", "128", "--intermediate", "256", "--layers", "1", "--vocab", "256",
                                 "--context", "8", "--prefill", "16", "--rounds", "2", "--decode-batch", "3",
                                 "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "2:4", "unstructured 50%", "activation 50%",
                                            "weight 50% + activation 50%"]
    assert all(r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["decode_b3_tok_s"] > 0 for r in rows)
    assert rows[0]["decode_b3_speedup"] == 1.0 and "decode_b4_tok_s" not in rows[0]
    assert all(r["logits_rel_err"] is not None for r in rows[1:])


def test_gpu_models_runs_on_the_cpu_for_a_check(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "gpu_models.json"
    result = script("gpu_models").main(["--device", "cpu", "--hidden", "128", "--intermediate", "256", "--layers",
                                        "1", "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--prefill", "16",
                                        "--rounds", "2", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {r["variant"] for r in result["rows"]} == {"dense", "2:4", "unstructured 50%", "activation 50%"}
    assert all("decode_graph_ms" not in r for r in result["rows"])  # graphs only on a GPU
    reports = json.loads(out.read_text())["reports"]
    assert set(reports) == {"2:4", "unstructured 50%", "activation 50%"}
    assert all(layer["backend"] for r in reports.values() for layer in r["layers"])


def test_gpu_layer_paths_runs_on_the_cpu_for_a_check(tmp_path):
    out = tmp_path / "paths.json"
    script("gpu_layer_paths").main(["--device", "cpu", "--shapes", "96x64", "--rows", "24", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["sparsify_timing"] for r in results] == ["as graphs", "eagerly"]
    assert all({"F.linear dense", "module", "cpp", "batched"} <= set(r["eager_us"]) for r in results)


def test_bench_formats_writes_its_table(tmp_path):
    out = tmp_path / "formats.json"
    script("bench_formats").main(["--rows", "64", "--cols", "128", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())
