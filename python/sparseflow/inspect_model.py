"""`sparseflow inspect PATH`: what is in a checkpoint, layer by layer (pattern, density, format,
bytes), and what sparsify would choose for each on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import dispatch
from .formats import SparseFormat, detect_pattern
from .io import load_weights, read_compressed_tensors
from .io._safetensors import read_safetensors
from .model_io import DESCRIPTION, WEIGHTS
from .sparsify import candidates_for


def read_any(path: str | Path) -> dict[str, SparseFormat | torch.Tensor]:
    """Weights of: a sparseflow model dir, a sparseflow weights file, a compressed-tensors dir, or any
    safetensors file / dir (dense)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    file = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        if "sparsity_config" in (config.get("quantization_config") or {}):
            return read_compressed_tensors(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS}")
    metadata, tensors = read_safetensors(file)
    if "sparseflow" in metadata and not (path.is_dir() and (path / DESCRIPTION).exists()):
        return load_weights(file)
    if "sparseflow" in metadata:  # saved by sf.save_pretrained (a stale sparseflow.json alone does not count)
        try:
            modules = json.loads(metadata["sparseflow"])["modules"]
        except (KeyError, TypeError, ValueError, RecursionError):
            raise ValueError(f"{file}: damaged sparseflow description") from None
        return _sparse_layers(tensors, modules)
    return tensors


def _sparse_layers(tensors: dict, modules: dict) -> dict:
    from .nn.sparse_linear import SparseLinear  # rebuild each sparse layer from its buffers

    out = dict(tensors)
    for name, spec in modules.items():
        if spec.get("type") != "SparseLinear" or spec.get("format") == "dense":
            continue
        layer = SparseLinear.empty(spec["format"], spec.get("params") or {}, tuple(spec["shape"]), spec["bias"])
        prefix = name + "."
        layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False)
        for k in [k for k in out if k.startswith(prefix + "weight_")]:
            del out[k]
        out[prefix + "weight"] = layer.weight
    return out


def inspect(path: str | Path, measure: bool = True, m_range=(1, 16)) -> list[dict]:
    rows = []
    for name, w in read_any(path).items():
        is_format = isinstance(w, SparseFormat)
        if not is_format and (w.dim() != 2 or not w.is_floating_point() or not name.endswith("weight")):
            continue
        dense = w.to_dense() if is_format else w
        pattern = detect_pattern(dense)
        row = {"name": name, "shape": list(dense.shape), "dtype": str(dense.dtype), "pattern": str(pattern),
               "density": round(pattern.density, 4), "format": w.format_name if is_format else "dense",
               "bytes": w.nbytes if is_format else w.numel() * w.element_size(), "would_choose": None}
        if measure and pattern.kind != "dense":
            cands = candidates_for(dense, "auto")
            speed = dispatch.measure(dense, cands, tuple(m_range))
            best = max(cands, key=lambda c: speed[c][m_range[0]])
            row["would_choose"] = best if speed[best][m_range[0]] >= 1.0 else "dense"
            row["speedup"] = {str(m): round(speed[best][m], 3) for m in m_range}
        rows.append(row)
    return rows
