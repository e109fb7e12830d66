"""Legacy compressed-tensors sparse checkpoints ("sparse-bitmask", "sparse-24-bitmask"), read and
written with torch and safetensors only (the compressed-tensors package is not needed).

The layout matches compressed-tensors 0.14.0.1, checked against its source:
compressors/sparse_compressors/sparse_bitmask.py, sparse_24_bitmask.py and base.py,
utils/helpers.py (pack_bitmasks) and compressors/model_compressors/model_compressor.py
(update_config). For a Linear module M (state-dict key "M.weight"), the file holds no "M.weight"
but:

- M.compressed  the kept values. sparse-bitmask: 1-D, the non-zeros (w != 0) in row-major order.
                sparse-24-bitmask: [out, in / 2], the 2 largest |w| of every group of 4 (so a kept
                value can be zero), row-major.
- M.bitmask     uint8 [out, ceil(in / 8)]: numpy.packbits(w_kept, axis=-1, bitorder="little").
- M.shape       int64 [out, in]: shape [2] for sparse-bitmask, [2, 1] for sparse-24-bitmask.
- M.row_offsets int64 [out], sparse-bitmask only: the index in M.compressed where each row starts.

config.json carries {"quantization_config": {"version", "quant_method": "compressed-tensors",
"sparsity_config": {"format", "targets", "ignore", "global_sparsity", "sparsity_structure", ...},
"transform_config": {}}}; readers take the format from quantization_config.sparsity_config.format.

The library groups 2:4 over the flattened tensor, so groups cross rows when in_features % 4 != 0;
sparseflow's N:M groups are per row, so both directions require in_features % 4 == 0 for 2:4.
Quantized values (int8, fp8: sparse + quantized stacks) are not supported and raise ValueError."""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import torch

from ..formats import NM, Bitmask, SparseFormat
from ..formats._bits import pack_bits, pack_fields, unpack_bits
from ..formats.base import FLOAT_DTYPES
from ._atomic import atomic_write_bytes, replacing_files
from ._safetensors import read_safetensors, write_safetensors

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
MATCHED_VERSION = "0.14.0.1"  # the compressed-tensors release whose layout this file reproduces
PARAMS = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MAX_DIM = 2**31 - 1

Weights = dict[str, "SparseFormat | torch.Tensor"]


# ---------------------------------------------------------------- files and config


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _sparsity_format(config: Any, where: str) -> str | None:
    """The sparse format named in a config.json, or None when it names none (or "dense")."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config must be a JSON object")
    qc = config.get("quantization_config", config.get("compression_config"))
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object")
    sc = qc.get("sparsity_config")
    if not sc:
        return None
    if not isinstance(sc, dict):
        raise ValueError(f"{where}: quantization_config.sparsity_config must be a JSON object")
    fmt = sc.get("format")
    if fmt in (None, "dense"):
        return None
    if not isinstance(fmt, str) or fmt not in PARAMS:
        raise ValueError(f"{where}: sparsity format {fmt!r} is not supported (only {', '.join(PARAMS)})")
    return fmt


def _checkpoint_files(path: str) -> tuple[list[str], str | None]:
    """(safetensors files, config.json or None) of a model directory or a single file."""
    if os.path.isfile(path):
        config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
        return [path], config if os.path.isfile(config) else None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    config = os.path.join(path, CONFIG_NAME)
    config = config if os.path.isfile(config) else None
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return [os.path.join(path, WEIGHTS_NAME)], config
    index_path = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    index = _load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        # Shards are plain file names in the same directory; anything else could point outside it.
        if name in ("", ".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name:
            raise ValueError(f"{index_path}: shard name {name!r} is not a plain file name")
    return [os.path.join(path, name) for name in files], config


# ---------------------------------------------------------------- read


def _shape(name: str, t: torch.Tensor) -> tuple[int, int]:
    if t.dtype not in (torch.int64, torch.int32) or t.numel() != 2:
        raise ValueError(f"{name}.shape must hold 2 integers, got {t.dtype} {tuple(t.shape)}")
    rows, cols = (int(v) for v in t.flatten().tolist())
    if not (1 <= rows <= MAX_DIM and 1 <= cols <= MAX_DIM):
        raise ValueError(f"{name}.shape is {[rows, cols]}; both sides must be in [1, {MAX_DIM}]")
    return rows, cols


def _values(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}.compressed is {t.dtype}; only float32, bfloat16 and float16 values are supported "
            "(quantized sparse checkpoints are not)"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}.compressed must have shape {shape}, got {tuple(t.shape)}")
    return t


def _bitmask(name: str, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    expected = (rows, (cols + 7) // 8)
    if t.dtype != torch.uint8 or tuple(t.shape) != expected:
        raise ValueError(f"{name}.bitmask must be uint8 {expected}, got {t.dtype} {tuple(t.shape)}")
    if cols % 8 and rows and bool(t[:, -1].bitwise_right_shift(cols % 8).any()):  # (bit k is column 8b + k)
        raise ValueError(f"{name}.bitmask sets bits past in_features ({cols}) in its last byte")
    return t


def _read_bitmask(name: str, p: dict[str, torch.Tensor]) -> Bitmask:
    rows, cols = _shape(name, p["shape"])
    values = _values(name, p["compressed"], None)
    if values.dim() != 1:
        raise ValueError(f"{name}.compressed must be 1-D for {SPARSE_BITMASK}, got {tuple(values.shape)}")
    mask = _bitmask(name, p["bitmask"], rows, cols)
    starts = p["row_offsets"]
    if starts.dtype not in (torch.int64, torch.int32) or tuple(starts.shape) != (rows,):
        got = f"{starts.dtype} {tuple(starts.shape)}"
        raise ValueError(f"{name}.row_offsets must be int64 ({rows},), got {got}")
    # compressed-tensors stores where each row starts; sparseflow adds the end of the last row.
    offsets = torch.cat([starts.to(torch.int64), torch.tensor([values.numel()], dtype=torch.int64)])
    return Bitmask.from_tensors((rows, cols), {"values": values, "mask": mask, "row_offsets": offsets})


def _read_24(name: str, p: dict[str, torch.Tensor]) -> NM:
    rows, cols = _shape(name, p["shape"])
    if cols % 4:
        raise ValueError(f"{name}: in_features {cols} is not a multiple of 4; 2:4 groups would span rows")
    values = _values(name, p["compressed"], (rows, cols // 2))
    kept = unpack_bits(_bitmask(name, p["bitmask"], rows, cols), cols).view(rows, cols // 4, 4)
    bad = kept.sum(-1) != 2
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}.bitmask: row {r}, group {g} keeps {int(kept[r, g].sum())} values, not 2")
    # A stable sort puts the kept positions of each group first, in ascending order.
    positions = torch.argsort((~kept).to(torch.uint8), dim=-1, stable=True)[..., :2]
    index = pack_fields(positions.reshape(rows, -1).to(torch.uint8), 2)
    return NM.from_tensors((rows, cols), {"values": values, "index": index}, n=2, m=4)


def _infer_format(params: dict[str, torch.Tensor]) -> str:
    """sparse-bitmask stores row_offsets and its values flat; sparse-24-bitmask values [rows, cols / 2]."""
    compressed = params.get("compressed")
    flat = isinstance(compressed, torch.Tensor) and compressed.dim() == 1
    return SPARSE_BITMASK if "row_offsets" in params or flat else SPARSE_24_BITMASK


def read_compressed_tensors(path: str | os.PathLike) -> Weights:
    """Reads a compressed-tensors checkpoint (a model directory with config.json and
    model.safetensors or a sharded index, or one .safetensors file): "M.weight" -> Bitmask for
    sparse-bitmask, NM(2, 4) for sparse-24-bitmask; every other tensor passes through. Without a
    config.json the format of each module is inferred (row_offsets or flat values -> sparse-bitmask).
    Everything is validated; bad data raises ValueError naming the tensor."""
    path = os.fspath(path)
    files, config_path = _checkpoint_files(path)
    fmt = _sparsity_format(_load_json(config_path), config_path) if config_path else None
    stored: dict[str, torch.Tensor] = {}
    for file in files:
        for key, t in read_safetensors(file)[1].items():
            if key in stored:
                raise ValueError(f"{file}: tensor {key!r} also appears in another shard")
            stored[key] = t
    if config_path and fmt is None:
        return stored  # the config says the checkpoint is not sparse-compressed

    # Group "M.<param>" by M, as compressed-tensors' get_nested_weight_mappings does.
    names = PARAMS[fmt] if fmt else PARAMS[SPARSE_BITMASK]
    pattern = re.compile(r"^(.*)\.(" + "|".join(names) + r")$")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in stored.items():
        if match := pattern.match(key):
            groups.setdefault(match.group(1), {})[match.group(2)] = t
    modules = {m: p for m, p in groups.items() if "compressed" in p or "bitmask" in p}

    out: Weights = {}
    for key, t in stored.items():
        match = pattern.match(key)
        if not (match and match.group(1) in modules):
            out[key] = t
    for module, params in modules.items():
        module_fmt = fmt or _infer_format(params)
        missing = [f"{module}.{p}" for p in PARAMS[module_fmt] if p not in params]
        if missing:
            raise ValueError(f"{path}: {module_fmt} weight {module!r} lacks {missing}")
        name = f"{module}.weight"
        if name in out:
            raise ValueError(f"{path}: {name!r} is stored both dense and compressed")
        read = _read_bitmask if module_fmt == SPARSE_BITMASK else _read_24
        try:
            out[name] = read(module, params)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        except (TypeError, RuntimeError, IndexError) as e:  # crafted data: report, never crash
            raise ValueError(f"{path}: {module}: invalid {module_fmt} data ({type(e).__name__}: {e})") from e
    return out


# ---------------------------------------------------------------- write


def _as_bitmask(w: SparseFormat) -> Bitmask:
    return w if isinstance(w, Bitmask) else Bitmask.from_dense(w.to_dense())


def _as_24(name: str, w: SparseFormat) -> NM:
    if w.shape[1] % 4:
        raise ValueError(f"{name}: {SPARSE_24_BITMASK} needs in_features % 4 == 0, got {w.shape[1]}")
    if isinstance(w, NM) and (w.n, w.m) == (2, 4):
        return w
    try:
        return NM.from_dense(w.to_dense(), n=2, m=4)
    except ValueError as e:
        raise ValueError(f"{name}: cannot be written as {SPARSE_24_BITMASK}: {e}") from e


def _encode(name: str, w: SparseFormat, fmt: str) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    if fmt == SPARSE_BITMASK:
        b = _as_bitmask(w)
        return {
            "shape": torch.tensor([rows, cols], dtype=torch.int64),
            "compressed": b.values,
            "bitmask": b.mask,
            "row_offsets": b.row_offsets[:-1],  # row starts only, as compressed-tensors stores them
        }
    nm = _as_24(name, w)
    kept = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=nm.device)
    kept.scatter_(-1, nm.positions().view(rows, -1, 2).to(torch.int64), True)
    return {
        "shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
        "compressed": nm.values,
        "bitmask": pack_bits(kept.view(rows, cols)),
    }


def write_compressed_tensors(
    weights: Weights, directory: str | os.PathLike, format: str = SPARSE_BITMASK, config: dict | None = None
) -> None:
    """Writes directory/model.safetensors and directory/config.json in compressed-tensors' layout
    (see the module docstring). Every sparseflow format is compressed (its key must end in
    ".weight"); plain tensors are stored as they are, so a dense tensor is compressed only if it is
    passed through sparseflow.io.compress first. For sparse-24-bitmask a weight that is not 2:4
    raises ValueError (it is never pruned). `config` (e.g. a transformers config dict) is copied
    with its "quantization_config" replaced by the sparsity config."""
    if format not in PARAMS:
        raise ValueError(f"format must be one of {list(PARAMS)}, got {format!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    directory = os.fspath(directory)
    tensors: dict[str, torch.Tensor] = {}
    targets, zeros, total = [], 0, 0

    def add(key: str, t: torch.Tensor) -> None:
        if key in tensors:
            raise ValueError(f"tensor name {key!r} would be written twice")
        tensors[key] = t

    for name, obj in weights.items():
        if isinstance(obj, SparseFormat):
            if not name.endswith(".weight"):
                raise ValueError(f"{name!r}: compressed weights must be named '<module>.weight'")
            module = name[: -len(".weight")]
            for param, t in _encode(name, obj, format).items():
                add(f"{module}.{param}", t)
            targets.append(module)
            total += obj.shape[0] * obj.shape[1]
            zeros += obj.shape[0] * obj.shape[1] - obj.nnz
        elif isinstance(obj, torch.Tensor):
            add(name, obj)
        else:
            raise TypeError(f"{name}: expected a sparseflow format or a tensor, got {type(obj).__name__}")

    sparsity_config = {
        "format": format,
        "targets": targets,  # compressed-tensors matches these against module names exactly
        "ignore": [],
        "global_sparsity": 100.0 * zeros / total if total else 0.0,  # a percentage, as llm-compressor writes
        "sparsity_structure": "2:4" if format == SPARSE_24_BITMASK else "unstructured",
        "registry_requires_subclass": False,
    }
    out_config = copy.deepcopy(config) if config else {}
    out_config["quantization_config"] = {
        "version": MATCHED_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config,
        "transform_config": {},
    }
    def dtype_name(obj):  # transformers writes torch_dtype as its name
        if isinstance(obj, torch.dtype):
            return str(obj).removeprefix("torch.")
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    try:
        text = json.dumps(out_config, indent=2, sort_keys=True, default=dtype_name) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"config cannot be written as JSON: {e}") from None
    # The weights and the config that says how to read them change together or not at all.
    with replacing_files(directory, (WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        atomic_write_bytes(tmp / CONFIG_NAME, text.encode())
