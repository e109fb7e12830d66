"""What this installation can run: versions, ISA levels, threads, CUDA and Triton."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import _ext
from ._version import __version__


def info() -> dict:
    features = _ext._C.cpu_features()
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # a broken triton install must not break info()
            triton_version = "unimportable"
    return {
        "sparseflow": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": features.pop("model") or platform.processor(),
        "isa_built": list(_ext._C.built_isas()),
        "isa_available": _ext.available_isas(),
        "isa_in_use": _ext.active_isa(),
        "cpu_features": [name for name, on in features.items() if on],
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_kernels_built": bool(_ext._C.cuda_built()),
        "triton": triton_version,
    }
