"""sparseflow's own weight checkpoint: one .safetensors file, never pickle.

Tensor names are "{name}.{buffer}" for a compressed weight (e.g. "fc1.weight.values") and the
name itself for a plain tensor. The safetensors header metadata holds one JSON string under the
key "sparseflow" that describes every entry:

    {"format_version": 1, "library_version": "0.1.0", "metadata": {...user JSON...},
     "entries": {"fc1.weight": {"format": "bitmask", "shape": [64, 128], "dtype": "float32", "params": {}},
                 "fc1.bias":   {"format": "tensor", "shape": [64], "dtype": "float32", "params": {}}}}

Loading trusts nothing in the file: the JSON is checked against this schema, the tensor names and
dtypes against the entries, and each format's from_tensors(validate=True) checks every index in
C++. Any problem raises ValueError naming the entry."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .._version import __version__
from ..formats import FORMATS, SparseFormat
from ..formats.base import FLOAT_DTYPES, param_names
from ._safetensors import read_safetensors, read_safetensors_metadata, write_safetensors

METADATA_KEY = "sparseflow"
FORMAT_VERSION = 1
PLAIN = "tensor"  # the "format" of an entry that is an ordinary tensor
MAX_DIM = 2**31 - 1  # keeps index arithmetic in every kernel far from overflow

# Plain tensors may have any of these dtypes (what safetensors stores, minus the exotic ones).
PLAIN_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
FORMAT_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)

Weights = dict[str, "SparseFormat | torch.Tensor"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- save


def _describe(name: str, obj: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """JSON entry and the tensors to store for one input."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"checkpoint names must be non-empty strings, got {name!r}")
    if isinstance(obj, SparseFormat):
        if FORMATS.get(obj.format_name) is not type(obj):
            raise TypeError(f"{name}: {type(obj).__name__} is not a registered sparseflow format")
        entry = {
            "format": obj.format_name, "shape": list(obj.shape), "dtype": _dtype_name(obj.dtype),
            "params": obj.params(),
        }
        return entry, {f"{name}.{buf}": t for buf, t in obj.tensors().items()}
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise TypeError(f"{name}: {obj.layout} tensors cannot be saved; use a sparseflow format or dense")
        if obj.dtype not in PLAIN_DTYPES.values():
            raise TypeError(f"{name}: dtype {obj.dtype} is not supported in a checkpoint")
        entry = {"format": PLAIN, "shape": list(obj.shape), "dtype": _dtype_name(obj.dtype), "params": {}}
        return entry, {name: obj}
    raise TypeError(f"{name}: expected a sparseflow format or a torch.Tensor, got {type(obj).__name__}")


def save_weights(tensors: Weights, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Writes compressed formats and plain tensors to one .safetensors file, atomically (a failed
    save leaves any previous file at `path` untouched). `metadata` is any JSON-serialisable dict,
    read back with load_metadata."""
    entries, flat = {}, {}
    for name, obj in tensors.items():
        entry, stored = _describe(name, obj)
        for key in stored:
            if key in flat:
                raise ValueError(f"tensor name {key!r} is produced twice; rename {name!r}")
        entries[name] = entry
        flat.update(stored)
    header = {
        "format_version": FORMAT_VERSION, "library_version": __version__, "metadata": metadata or {},
        "entries": entries,
    }
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    write_safetensors(path, flat, {METADATA_KEY: text})


# ---------------------------------------------------------------- load


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_param(name: str, key: str, value: Any) -> None:
    short_list = isinstance(value, list) and 0 < len(value) <= 4 and all(_is_int(v) for v in value)
    if not (_is_int(value) or short_list):
        raise ValueError(f"{name}: parameter {key!r} must be an int or a short list of ints, got {value!r}")


# An entry after checking: (format class, or None for a plain tensor; shape; dtype; params)
Spec = tuple["type[SparseFormat] | None", tuple[int, ...], torch.dtype, dict]


def _check_entry(name: str, entry: Any) -> Spec:
    """Schema of one JSON entry -> (format class or None for plain, shape, dtype, params)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{name}: entry must be a JSON object, got {type(entry).__name__}")
    fmt, shape, dtype = entry.get("format"), entry.get("shape"), entry.get("dtype")
    params = entry.get("params", {})
    if fmt != PLAIN and fmt not in FORMATS:
        raise ValueError(f"{name}: unknown format {fmt!r} (known: {', '.join([PLAIN, *FORMATS])})")
    if not isinstance(shape, list) or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape):
        raise ValueError(f"{name}: shape must be a list of ints in [0, {MAX_DIM}], got {shape!r}")
    if not isinstance(params, dict):
        raise ValueError(f"{name}: params must be a JSON object, got {params!r}")
    if fmt == PLAIN:
        if dtype not in PLAIN_DTYPES:
            raise ValueError(f"{name}: dtype {dtype!r} is not one of {sorted(PLAIN_DTYPES)}")
        if params:
            raise ValueError(f"{name}: a plain tensor takes no params, got {sorted(params)}")
        return None, tuple(shape), PLAIN_DTYPES[dtype], {}
    cls = FORMATS[fmt]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name}: a {fmt} weight needs a shape of 2 positive ints, got {shape!r}")
    if dtype not in FORMAT_DTYPES:
        raise ValueError(f"{name}: dtype {dtype!r} is not one of {sorted(FORMAT_DTYPES)}")
    expected = param_names(cls)
    if set(params) != expected:
        raise ValueError(f"{name}: {fmt} needs params {sorted(expected)}, got {sorted(params)}")
    for key, value in params.items():
        _check_param(name, key, value)
    return cls, tuple(shape), FORMAT_DTYPES[dtype], params


def _parse_header(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{path}: not a sparseflow checkpoint (no {METADATA_KEY!r} key in its metadata)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata must be a JSON object")
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {version} was written by a newer sparseflow "
            f"({header.get('library_version')!r}); this is {__version__}, which reads format {FORMAT_VERSION}"
        )
    if not isinstance(header.get("entries"), dict):
        raise ValueError(f"{path}: 'entries' must be a JSON object")
    if not isinstance(header.get("metadata", {}), dict):
        raise ValueError(f"{path}: 'metadata' must be a JSON object")
    return header


def _build(name: str, cls, shape, dtype, params, stored: dict[str, torch.Tensor]):
    """One entry from its stored tensors, fully validated."""
    if cls is None:
        t = stored[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: stored tensor is {t.dtype} {tuple(t.shape)}, the header says {dtype} {shape}"
            )
        return t
    buffers = {buf: stored[f"{name}.{buf}"] for buf in cls.tensor_names}
    values = buffers["values"]
    if values.dtype != dtype:
        raise ValueError(f"{name}: values are {values.dtype}, the header says {dtype}")
    for buf, t in buffers.items():
        if buf != "values" and t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name}: buffer {buf!r} must be an integer tensor, got {t.dtype}")
    try:
        return cls.from_tensors(shape, buffers, validate=True, **params)
    except ValueError as e:
        raise ValueError(f"{name}: invalid {cls.format_name} data: {e}") from e
    except (TypeError, RuntimeError, IndexError) as e:  # crafted data: report it as bad data
        raise ValueError(f"{name}: invalid {cls.format_name} data ({type(e).__name__}: {e})") from e


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> Weights:
    """Reads a checkpoint written by save_weights: name -> format or tensor, on `device`.
    Everything is validated on the CPU before anything is returned; bad data raises ValueError."""
    path = os.fspath(path)
    metadata, stored = read_safetensors(path)
    header = _parse_header(path, metadata)
    checked, expected = {}, {}
    for name, entry in header["entries"].items():
        cls, shape, dtype, params = _check_entry(name, entry)
        checked[name] = (cls, shape, dtype, params)
        for key in [name] if cls is None else [f"{name}.{buf}" for buf in cls.tensor_names]:
            if key in expected:
                raise ValueError(f"{path}: tensor {key!r} is claimed by both {expected[key]!r} and {name!r}")
            expected[key] = name
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        more = " ..." if len(extra) > 5 else ""
        raise ValueError(f"{path}: tensors not described by the header: {extra[:5]}{more}")
    out = {name: _build(name, *spec, stored) for name, spec in checked.items()}
    if torch.device(device).type != "cpu":
        out = {name: obj.to(device) for name, obj in out.items()}
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `metadata` dict given to save_weights (reads the header only, not the tensors)."""
    path = os.fspath(path)
    return _parse_header(path, read_safetensors_metadata(path)).get("metadata", {})
