"""Plain-Python helpers shared by the Triton kernel modules: launch arithmetic, argument checks and
the interpreter fix-up."""

from __future__ import annotations

import contextlib
import os

import torch

_SM_COUNT: dict[int, int] = {}


def autotuning() -> bool:
    """SPARSEFLOW_TRITON_AUTOTUNE=0 makes every launcher use its first config (no benchmarking of
    configs: GPU test runs); read when a kernel module is imported."""
    return os.environ.get("SPARSEFLOW_TRITON_AUTOTUNE", "1") != "0"

# Programs per SM that split-K launchers aim for: enough loads in flight to saturate memory.
PROGRAMS_PER_SM = 4


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (interpreter), so split-K still splits."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def split_k_for(m: int, n: int, chunks: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Slices of K (each a whole number of its `chunks`) that give about PROGRAMS_PER_SM programs
    per SM over the output tiles, with no empty slice."""
    n_tiles = -(-n // block_n) * -(-m // block_m)
    want = max(1, min(chunks, PROGRAMS_PER_SM * sm_count(device) // n_tiles))
    per_slice = -(-chunks // want)
    return -(-chunks // per_slice)


def split_k_heuristic(args: dict) -> int:
    """split_k as a triton.heuristics value of a split-K launcher (M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
    x_ptr among its arguments)."""
    return split_k_for(args["M"], args["N"], -(-args["K"] // args["BLOCK_K"]), args["BLOCK_M"], args["BLOCK_N"],
                       args["x_ptr"].device)


MIN_BLOCK_N = 16  # smallest BLOCK_N of any split-K config: sizes the ticket counters


def split_k_buffers(device: torch.device, m: int, n: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partial sums [m * n], int32 tickets, one per output tile) of a split-K launch: views of
    the stream's zeroed workspace (see zeroed_workspace)."""
    counters = -(-n // MIN_BLOCK_N) * -(-m // block_m)
    buf = zeroed_workspace(device, 4 * (m * n + counters))
    return buf[: m * n].view(torch.float32), buf[m * n: m * n + counters]


def unsplit_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for a launch that does not split K: never touched, but typed fp32 / int32 so that
    the (dead) atomic branch never compiles a bf16 atomic."""
    return torch.empty(1, dtype=torch.float32, device=device), torch.empty(1, dtype=torch.int32, device=device)


_WORKSPACES: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown workspaces stay alive: a captured CUDA graph may use them
_MIN_WORKSPACE_WORDS = 1 << 16


def zeroed_workspace(device: torch.device, nbytes: int) -> torch.Tensor:
    """An int32 buffer of at least `nbytes` that is all zeros whenever a kernel on the current stream
    starts with it: the split-K kernels (Triton act-sparse, CUDA C++ GEMVs) accumulate fp32 partial
    sums and tickets in it and their last block of each tile zeroes what it used. One buffer per
    (device, stream), so no memset launch per call; kernels on one stream run in order. Two graphs
    captured on one stream share it, so replay them on one stream too."""
    words = max(1, (nbytes + 3) // 4)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < words:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(words, _MIN_WORKSPACE_WORDS), dtype=torch.int32, device=device)
        _WORKSPACES[key] = buf
    return buf


def m_bucket(m: int) -> int:
    """Autotuning key for the number of rows of x: exact up to 16 (decode), else the next power of two."""
    return m if m <= 16 else min(1 << (m - 1).bit_length(), 16384)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run in full precision (tf32 would miss the 2x-of-dense error bound)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Grid axes 1 and 2 take at most 65535 programs: kernels that put blocks of rows there (at least 16
# rows each) run larger inputs in launches of this many rows.
LAUNCH_ROWS = 65535 * 16


def in_row_launches(fn, x2: torch.Tensor, y: torch.Tensor, *args) -> torch.Tensor | None:
    """fn(x2 rows, *args, out=y rows) for each launch's rows, or None where one launch takes x2."""
    if x2.shape[0] <= LAUNCH_ROWS:
        return None
    for s in range(0, x2.shape[0], LAUNCH_ROWS):
        fn(x2[s : s + LAUNCH_ROWS], *args, out=y[s : s + LAUNCH_ROWS])
    return y


def output(x2: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """The [M, n] result: `out` after checking it (tests pass a poisoned one), or a new tensor."""
    if out is None:
        return torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    if tuple(out.shape) != (x2.shape[0], n) or out.dtype != x2.dtype or out.device != x2.device:
        raise ValueError(f"out must be {x2.dtype} [{x2.shape[0]}, {n}] on {x2.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if out.stride(1) != 1:
        raise ValueError("out must have unit stride along its last dimension")
    return out


def check_x(x2: torch.Tensor, k: int, dtype: torch.dtype, what: str, interpret: bool) -> None:
    if x2.device.type != "cuda" and not interpret:
        raise RuntimeError(f"{what}: Triton kernels take CUDA tensors (CPU tensors only in the Triton "
                           "interpreter: TRITON_INTERPRET=1 set before Triton is imported)")
    if x2.dim() != 2 or x2.shape[1] != k:
        raise ValueError(f"{what}: x must be [M, {k}], got {tuple(x2.shape)}")
    if x2.dtype != dtype:
        raise TypeError(f"{what}: x is {x2.dtype}, the weight is {dtype}")
    if x2.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what}: x must be float32, float16 or bfloat16, got {x2.dtype}")


def bias_or_dummy(bias: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Triton needs a pointer even when HAS_BIAS is off; y stands in for it."""
    if bias is None:
        return y, False
    return bias.contiguous(), True


def on_device(t: torch.Tensor):
    """Launch on t's device (Triton launches on the current CUDA device)."""
    if t.device.type != "cuda" or t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def choose_configs(interpret: bool, interpreter_config, configs: list) -> list:
    """A kernel's autotune configs: the one small config under the interpreter (tests on the CPU),
    else `configs` (only the first when autotuning is off)."""
    if interpret:
        return [interpreter_config]
    return configs if autotuning() else configs[:1]


def interpreter_mode() -> bool:
    """Whether Triton runs in its CPU interpreter (read when a kernel module is imported); applies
    the interpreter fix-up below when it does, so kernel modules need not."""
    import triton

    interpret = bool(triton.knobs.runtime.interpret)
    if interpret:
        patch_interpreter()
    return interpret


def patch_interpreter() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int(array of shape (1,)), which
    NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream by #9172 after 3.6). Wrap its
    tensor patching so __index__ takes the single element explicitly. Idempotent; interpreter only."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_sparseflow_index_fix", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._sparseflow_index_fix = True
