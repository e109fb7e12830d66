"""Triton kernels for CUDA devices, one module per format (installed as `sparseflow.kernels`).

- `bsr`: BSR matmul for any M (GEMV for M = 1, tensor-core tiles otherwise).
- `nm`: N:M matmul (2:4 and general n:m) that decompresses the weight in registers; decode
  (M <= 16) and prefill launchers.
- `bitmask`: bitmask GEMV for decode (M <= 16).
- `act_sparse`: activation-sparse GEMV over the transposed weight (threshold fused, split-K with
  an fp32 workspace, so fp16 and bf16 both work), also for M > 1.

Each module has a wrapper on plain tensors (`bsr_linear`, `nm_linear`, `bitmask_linear`,
`act_sparse_dense`) that takes the format object (duck-typed: the modules import only torch and
Triton) and accepts `out=` so tests can poison the output. The backend table reaches them through
`sparseflow.ops.gpu`. Importing this package does not import Triton; importing a kernel module does.

CPU testing: in Triton's interpreter (`TRITON_INTERPRET=1`) the same wrappers run on CPU tensors.
The mode is per process and fixed when Triton is imported (`triton.jit` picks compiled or
interpreted at decoration time, Triton's own library functions included), so either export
TRITON_INTERPRET=1 before starting Python or call `enable_interpreter()` before anything imports
Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys

KERNEL_MODULES = ("act_sparse", "bitmask", "bsr", "nm")


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_active() -> bool:
    """Whether Triton kernels in this process run in the interpreter: Triton is imported in that
    mode, or not imported yet and TRITON_INTERPRET=1 is set."""
    if "triton.language" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction) and bool(__import__("triton").knobs.runtime.interpret)


def enable_interpreter() -> None:
    """Put Triton in interpreter mode for the rest of this process (CPU tensors; no compiled
    kernels afterwards). Raises RuntimeError if Triton was already imported in compiled mode."""
    if interpreter_active():
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "Triton is already imported in compiled mode; the interpreter must be chosen before that "
            "(export TRITON_INTERPRET=1 before starting Python)"
        )
    os.environ["TRITON_INTERPRET"] = "1"


__all__ = ["KERNEL_MODULES", "enable_interpreter", "interpreter_active", "triton_available"]
