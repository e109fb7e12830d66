"""Measured dispatch: time dense F.linear against each applicable sparse format on this machine,
for the row counts a model will see, and remember the result on disk.

The cache key holds everything the timing depends on (CPU model, ISA level, threads, torch and
sparseflow versions, dtype, shape, format, density, rows), so a hit costs no timing. The file is
JSON: $SPARSEFLOW_CACHE_DIR/dispatch.json, default ~/.cache/sparseflow."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _ext
from ._version import __version__
from .bench.timing import compare
from .formats import SparseFormat
from .io._atomic import atomic_write_bytes
from .ops import linear

_LOCK = threading.Lock()


def cache_path() -> Path:
    root = os.environ.get("SPARSEFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparseflow")
    return Path(root) / "dispatch.json"


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-measurement


def machine_key() -> str:
    features = _ext._C.cpu_features()
    return "|".join([features["model"], _ext.active_isa(), f"t{torch.get_num_threads()}", torch.__version__,
                     __version__])


def case_key(w: SparseFormat, fmt_label: str, m: int) -> str:
    n, k = w.shape
    return f"{machine_key()}|{w.dtype}|{n}x{k}|{fmt_label}|d{w.density:.2f}|m{m}"


def measure(dense_w: torch.Tensor, candidates: dict[str, SparseFormat], rows: tuple[int, ...],
            reps: int = 15, use_cache: bool = True) -> dict[str, dict[int, float]]:
    """Speedup over dense (dense time / sparse time) of each candidate at each row count."""
    cache = _load() if use_cache else {}
    out: dict[str, dict[int, float]] = {label: {} for label in candidates}
    fresh: dict[str, float] = {}
    for m in rows:
        todo = {}
        for label, w in candidates.items():
            key = case_key(w, label, m)
            if key in cache:
                out[label][m] = float(cache[key])
            else:
                todo[label] = (key, w)
        if not todo:
            continue
        x = torch.randn(m, dense_w.shape[1], dtype=dense_w.dtype, device=dense_w.device)
        fns = {"dense": lambda x=x: F.linear(x, dense_w)}
        for label, (_, w) in todo.items():
            fns[label] = lambda w=w, x=x: linear(x, w)
        stats = compare(fns, warmup=2, reps=reps, max_seconds=2.0)
        for label, (key, _) in todo.items():
            out[label][m] = fresh[key] = stats["dense"].median / stats[label].median
    if fresh and use_cache:
        with _LOCK:
            merged = _load()
            merged.update(fresh)
            path = cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(merged, indent=0, sort_keys=True).encode())
    return out
