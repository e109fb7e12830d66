"""`sparseflow convert SRC DST`: a transformers model directory in, a pruned and compressed
directory out (sparseflow's own, dense-with-zeros, or compressed-tensors). DST is written in a
temporary sibling directory and renamed into place at the end, so it is never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import model_io
from .prune import parse_pattern, prune
from .sparsify import sparsify


def _calibration(tokenizer, path: str | None, batches: int = 8, batch_size: int = 8):
    if path:
        sentences = [s.strip() for s in Path(path).read_text().splitlines() if s.strip()]
        if not sentences:
            raise ValueError(f"{path} holds no sentences")
    else:
        from .data import load_sentences

        sentences = load_sentences("calibration")
    chunks = [sentences[i : i + batch_size] for i in range(0, len(sentences), batch_size)][:batches]
    if getattr(tokenizer, "pad_token", None) is None:  # Llama, Mistral, GPT-2: pad with eos (or unk);
        # the attention mask keeps the padding out of the statistics
        filler = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if filler is None:  # nothing to pad with: one sentence per batch
            chunks = [[s] for s in sentences[: batches * batch_size]]
        else:
            tokenizer.pad_token = filler
    return [dict(tokenizer(c, padding=True, truncation=True, max_length=128, return_tensors="pt")) for c in chunks]


def _load_dense(src: Path):
    """The model in SRC with dense nn.Linear layers: a model sparseflow saved is rebuilt with its
    sparse layers and densified (zeros where pruned); any other through transformers, which must
    find every weight the architecture has (it would start the missing ones from random values)."""
    import transformers

    if model_io.saved_by_sparseflow(src):
        return model_io.densified(model_io.from_pretrained(src)).eval()
    config = transformers.AutoConfig.from_pretrained(src)
    arch = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, transformers.AutoModel)
    try:
        model, info = cls.from_pretrained(src, output_loading_info=True)
    except (OSError, ValueError, ImportError):  # the CLI reports these as they are
        raise
    except Exception as e:  # e.g. safetensors' own error on a damaged weights file
        raise ValueError(f"{src}: cannot load the model's weights: {type(e).__name__}: {e}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        named = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{src}: its weights file lacks {len(missing)} of the model's weights ({named}); "
                         "a pruned model would start them from random values")
    return model.eval()


def convert(src, dst, method="wanda", sparsity=None, pattern="2:4", calibration=None, export="sparseflow",
            show=True) -> dict:
    """sparsity: the fraction pruned (default 0.5); an n:m pattern fixes it (1 - n/m), and another
    value is refused rather than ignored. calibration: for wanda and sparsegpt only."""

    spec = parse_pattern(pattern)  # a bad pattern string fails before any work
    if spec.kind == "n:m":
        if sparsity is not None and abs(sparsity - spec.fixed_sparsity) > 1e-9:
            raise ValueError(f"sparsity {sparsity} conflicts with pattern {pattern}, which prunes "
                             f"{spec.fixed_sparsity:g} of the weights; leave sparsity out for an n:m pattern")
        sparsity = spec.fixed_sparsity
    sparsity = 0.5 if sparsity is None else sparsity
    if method == "magnitude" and calibration is not None:
        raise ValueError("calibration is for wanda and sparsegpt: magnitude pruning reads no inputs")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a transformers model directory (no config.json)")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new directory")
    if export not in ("sparseflow", "dense", "compressed-tensors"):
        raise ValueError(f"export must be sparseflow, dense or compressed-tensors, got {export!r}")
    # The output's place first: a directory that cannot be written fails now, not after the pruning.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        report = _convert(src, dst, tmp, method, sparsity, pattern, spec, calibration, export, show)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _convert(src, dst, tmp, method, sparsity, pattern, spec, calibration, export, show) -> dict:
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _load_dense(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src) if any(src.glob("tokenizer*")) else None
    calib = None
    if method != "magnitude":
        if tokenizer is None:
            raise ValueError(f"{method} needs calibration inputs, and {src} has no tokenizer")
        calib = _calibration(tokenizer, calibration)
    prune_report = prune(model, method=method, sparsity=sparsity, pattern=pattern, calibration=calib)
    if spec.kind in ("neurons", "heads"):
        from .prune import shrink

        shrink(model)  # structured: smaller dense layers, no sparse format needed
    storable = spec.kind == "block" or (spec.kind == "n:m" and spec.m in (4, 8, 16))
    pruned = [row.name for row in prune_report if row.sparsity > 0]
    sparsify_report = sparsify(model, format=str(spec) if storable else "auto", include=pruned)
    if export == "sparseflow":
        model_io.save_pretrained(model, tmp)
    elif export == "dense":
        model_io.export_dense(model, tmp)
    else:
        ct_format = "sparse-24-bitmask" if str(spec) == "2:4" else "sparse-bitmask"
        model_io.export_compressed_tensors(model, tmp, ct_format)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # (mkdtemp made it 0700: the model is for other users too)
    os.replace(tmp, dst)
    report = {"src": str(src), "dst": str(dst), "method": method, "sparsity": sparsity, "pattern": pattern,
              "export": export, "bytes_before": sparsify_report.bytes_before,
              "bytes_after": sparsify_report.bytes_after,
              "layers": json.loads(sparsify_report.to_json())["layers"]}
    if show:
        print(prune_report)
        print(sparsify_report)
        print(f"wrote {dst}")
    return report
