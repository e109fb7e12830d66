"""`sparseflow inspect PATH`: what is in a checkpoint, layer by layer (pattern, density, format,
bytes), and what sparsify would choose for each on this machine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dispatch
from .formats import SparseFormat, detect_pattern
from .formats.base import FLOAT_DTYPES
from .io import load_weights, read_compressed_tensors
from .io._safetensors import read_safetensors
from .model_io import WEIGHTS, skeleton
from .sparsify import candidates_for


@dataclass
class Stored:
    """A layer's [out, in] weight, and the form and bytes it is stored in where that is not a format
    object of the weight itself (activation-sparse layers keep it transposed)."""

    weight: torch.Tensor
    format: str
    nbytes: int


def read_any(path: str | Path) -> dict[str, SparseFormat | Stored | torch.Tensor]:
    """Weights of: a sparseflow model dir or its model.safetensors, a sparseflow weights file, a
    compressed-tensors dir, or any safetensors file / dir (dense)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    file = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and (path / "config.json").exists():
        try:
            config = json.loads((path / "config.json").read_text())
        except (ValueError, RecursionError):
            raise ValueError(f"{path / 'config.json'} is not valid JSON") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'} is not a JSON object")
        quantization = config.get("quantization_config")
        if isinstance(quantization, dict) and "sparsity_config" in quantization:
            return read_compressed_tensors(path)
    if path.is_dir() and not file.is_file() and (path / "model.safetensors.index.json").is_file():
        return read_compressed_tensors(path)  # a sharded checkpoint: its shards' tensors (dense ones pass through)
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS}")
    metadata, tensors = read_safetensors(file)
    if "sparseflow" not in metadata:
        return tensors
    try:
        description = json.loads(metadata["sparseflow"])
    except (TypeError, ValueError, RecursionError):
        raise ValueError(f"{file}: damaged sparseflow description") from None
    if isinstance(description, dict) and "modules" in description:  # written by sf.save / save_pretrained
        if not isinstance(description["modules"], dict):
            raise ValueError(f"{file}: damaged sparseflow description")
        return _sparse_layers(tensors, description["modules"])
    return load_weights(file)  # written by sf.save_weights


def _sparse_layers(tensors: dict, modules: dict) -> dict:
    """The tensors, each sparse layer's buffers replaced by its weight (rebuilt and validated)."""
    from .nn import SparseLinear

    out = dict(tensors)
    for name, spec in modules.items():
        prefix = f"{name}." if name else ""
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not isinstance(spec, dict) or spec.get("type") not in ("SparseLinear", "ActSparseLinear"):
            continue
        layer = skeleton(spec)  # (each field checked, as sf.load checks it)
        try:
            if isinstance(layer, SparseLinear):
                layer.load_state_dict(own, strict=False)
                weight = layer.weight
            else:
                layer.load_state_dict(own, strict=False)
                nbytes = sum(t.numel() * t.element_size() for n, t in layer.named_buffers() if n.startswith("weight_t"))
                weight = Stored(layer.to_linear().weight.detach(), f"act-sparse({spec['weight_format']})", nbytes)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{name}: damaged sparseflow description ({type(e).__name__}: {e})") from None
        for k in [k for k in out if k.startswith(prefix + "weight_")]:
            del out[k]
        out[prefix + "weight"] = weight
    return out


def inspect(path: str | Path, measure: bool = True, m_range=(1, 16)) -> list[dict]:
    rows = []
    for name, w in read_any(path).items():
        if isinstance(w, Stored):
            dense, fmt, nbytes = w.weight, w.format, w.nbytes
        elif isinstance(w, SparseFormat):
            dense, fmt, nbytes = w.to_dense(), w.format_name, w.nbytes
        elif w.dim() == 2 and w.is_floating_point() and name.endswith("weight"):
            dense, fmt, nbytes = w, "dense", w.numel() * w.element_size()
        else:
            continue
        if dense.dtype not in FLOAT_DTYPES:  # (float64, fp8: listed, not sparsified)
            density = float(torch.count_nonzero(dense.float())) / max(1, dense.numel())
            rows.append({"name": name, "shape": list(dense.shape), "dtype": str(dense.dtype),
                         "pattern": "unsupported dtype", "density": round(density, 4), "format": fmt, "bytes": nbytes,
                         "would_choose": None})
            continue
        pattern = detect_pattern(dense)
        row = {"name": name, "shape": list(dense.shape), "dtype": str(dense.dtype), "pattern": str(pattern),
               "density": round(pattern.density, 4), "format": fmt, "bytes": nbytes, "would_choose": None}
        if measure and pattern.kind != "dense":
            cands = candidates_for(dense, "auto")
            speed = dispatch.measure(dense, cands, tuple(m_range))
            best = max(cands, key=lambda c: speed[c][m_range[0]])
            row["would_choose"] = best if speed[best][m_range[0]] >= 1.0 else "dense"
            row["speedup"] = {str(m): round(speed[best][m], 3) for m in m_range}
        rows.append(row)
    return rows
