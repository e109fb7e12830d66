"""Measured dispatch: time dense F.linear against each applicable sparse format on this machine,
for the row counts a model will see, and remember the result on disk.

Each format is timed two ways: its sparse kernel (the table's default backend) and, for more than
one row of x, the batched path a SparseLinear runs above its crossover (ops.table.batched_backend:
chunked C++ decompression + dense GEMM on the CPU, torch's on a GPU). Activation-sparse layers are timed the same
two ways, for a given fraction of skipped inputs (measure_act). The cache key holds everything a timing depends
on (CPU model, ISA level, threads, torch and sparseflow versions, dtype, shape, format, density,
skipped inputs, rows, path), so a hit costs no timing; `remeasure=True` times again and overwrites. On the
CPU each timed sample runs over cold copies of the weight (bench.timing.cold_copies), so that every call
reads its weight from memory as a model's next layer does, not from the caches a repeated call would
leave it in (which made dense 33 MB layers look up to 15% faster against the batched paths). The file is
JSON, $SPARSEFLOW_CACHE_DIR/dispatch.json (default ~/.cache/sparseflow): {"schema": SCHEMA,
"entries": {key: speedup}}; a file of another schema, or one that fails to parse, counts as empty and is
replaced, and an entry that is not a finite positive number counts as a miss. Processes serialise their
updates with a lock file beside it; where the directory cannot be written, a warning says so once and the
timings are used unsaved."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

import torch
import torch.nn.functional as F

from . import _ext
from ._version import __version__
from .bench.timing import cold_copy_count, compare_blocks
from .formats import SparseFormat
from .io._atomic import atomic_write_bytes
from .ops import act_sparse_linear, linear, table
from .ops.bound import BoundKernel, fast_kernel, unbind
from .ops.cpu import kernel_takes_batch

# Bump when what a timing means changes, so older entries are never reused. 2: the batched path
# above the crossover is chunked C++ decompression + GEMM (was: torch decompression + GEMM).
# 3: weights timed cold, over rotated copies (was: the same weight every call, partly cached).
# 4: an act-sparse batch the C++ kernel runs itself is timed through the bound kernel, as the
# module now calls it (was: through the custom op).
# 5: GPU samples last until the queued work is done (were the launches' host time).
# 6: bf16 act-sparse batches skip their inactive inputs (csrc/cpu/kernels/gemm_skip.h): older
# prefill timings of act-sparse layers measured the GEMM that multiplies them.
# 7: a GPU layer's batched path is torch decompression + cuBLAS in x's dtype (was: the float32
# reference).
SCHEMA = 7
MAX_COPIES = 64  # cold copies of one weight at most (64 copies of a 1 MiB layer: 2x this L3)
COMPUTE_ROWS, BATCH_COPIES = 64, 4  # from 64 rows of x, 4 copies (see ColdCopies)
GPU_CALLS_PER_SAMPLE = 16  # queued back to back, so that one synchronisation per sample costs little

PATHS = ("kernel", "batched")

_LOCK = threading.Lock()


def cache_path() -> Path:
    root = os.environ.get("SPARSEFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparseflow")
    return Path(root) / "dispatch.json"


def _speedup(value) -> float | None:
    """A cached speedup, or None for anything that is not a finite positive number (a hand-edited or
    damaged entry, which then counts as a miss)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _load() -> dict[str, float]:
    """The cached entries of this schema ({} for a missing, damaged or older file)."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError, RecursionError):
        return {}  # a missing or damaged cache only costs a re-measurement
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
        return {}
    entries = {key: _speedup(value) for key, value in data["entries"].items()}
    return {key: value for key, value in entries.items() if value is not None}


LOCK_WAIT_S = 10.0  # how long a write waits for another holder of the cache's lock before giving up
_LOCK_GAVE_UP: list[float] = []  # when a write last gave up: the next minute's writes try once, not wait


@contextlib.contextmanager
def _file_lock(path: Path):
    """Other processes' read-update-write of the cache waits for ours (POSIX; elsewhere a lost entry
    only costs a re-measurement). A lock held longer than LOCK_WAIT_S (a stopped or hung process, a
    stuck network file system) is an OSError: the write is skipped, with the usual warning, rather
    than sparsify waiting for it."""
    if fcntl is None:
        yield
        return
    now = time.monotonic()
    wait_s = 0.0 if _LOCK_GAVE_UP and now - _LOCK_GAVE_UP[-1] < 60.0 else LOCK_WAIT_S
    with open(path.with_name(path.name + ".lock"), "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= now + wait_s:
                    _LOCK_GAVE_UP[:] = [time.monotonic()]
                    raise OSError(f"its lock {f.name} is held by another process") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store(fresh: dict[str, float]) -> None:
    path = cache_path()
    try:
        with _LOCK:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path):
                entries = _load()
                entries.update(fresh)
                data = {"schema": SCHEMA, "entries": entries}
                atomic_write_bytes(path, json.dumps(data, indent=0, sort_keys=True).encode())
    except OSError as e:  # the timings are still used; only remembering them failed
        _warn_unwritable(f"{path}: {e.strerror or e}")


@functools.cache
def _warn_unwritable(reason: str) -> None:
    warnings.warn(f"sparseflow could not write its timing cache ({reason}); timings will be measured again "
                  "next time. Set SPARSEFLOW_CACHE_DIR to a writable directory.", RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=1)
def kernels_build() -> str:
    """A fingerprint of the compiled kernels: a rebuilt _C (new or faster kernels) never reuses
    timings of the old one, even within one version."""
    return hashlib.sha1(Path(_ext._C.__file__).read_bytes()).hexdigest()[:12]


def machine_key() -> str:
    features = _ext._C.cpu_features()
    parts = [features["model"], _ext.active_isa(), f"t{torch.get_num_threads()}", torch.__version__, __version__,
             kernels_build()]
    forced = _ext._C.act_batch_gemm()  # a batch GEMM forced for a benchmark: its timings are not the default's
    if forced != "auto":
        parts.append(f"act-batch-{forced}")
    if os.environ.get("SPARSEFLOW_OWN_POOL", "")[:1] == "1" or not _ext._C.shares_torch_threads():
        parts.append("own-pool")  # the kernels on their own threads, not torch's: other timings
    return "|".join(parts)


# A timing whose speedup exceeds PLAUSIBLE x (dense bytes / sparse bytes) is retaken up to RETRIES times.
PLAUSIBLE, RETRIES = 1.5, 2


def device_key(device: torch.device, graphs: bool = False) -> str:
    """The device a timing ran on: "cpu", or the GPU's name (a CPU and a GPU timing of one case
    differ), "+graphs" for timings of CUDA-graph replays."""
    if device.type == "cpu":
        return "cpu"
    return f"{device.type}:{torch.cuda.get_device_name(device)}" + ("+graphs" if graphs else "")


def case_key(w: SparseFormat, fmt_label: str, m: int, path: str = "kernel", graphs: bool = False) -> str:
    n, k = w.shape
    return (f"{machine_key()}|{device_key(w.device, graphs)}|{w.dtype}|{n}x{k}|{fmt_label}|d{w.density:.2f}|m{m}"
            f"|{path}")


class ColdCopies:
    """A weight and the copies a timed sample at m rows goes through, made as first needed. On the
    CPU, below COMPUTE_ROWS rows: enough that cold_bytes() of the others (2x the LLC) is read
    between two calls on one (bench.timing.cold_copies), at most MAX_COPIES, so a weight under
    cold_bytes() / MAX_COPIES stays partly warm. From COMPUTE_ROWS rows, where a call is bound by
    arithmetic, at most BATCH_COPIES (64 copies of a small layer's long calls take seconds): there
    a weight under cold_bytes() / BATCH_COPIES (16 MiB here) may still be found in the LLC, a bias
    towards small (sparse) weights that the arithmetic dwarfs. On a CUDA GPU: enough to read twice
    its L2 in between. The copies of one layer cost about that much + its size each, dense and
    every candidate."""

    def __init__(self, w, nbytes: int):
        self.copies = [w]
        self.want = cold_copy_count(w, nbytes, MAX_COPIES)

    def __call__(self, m: int) -> list:
        n = self.want if m < COMPUTE_ROWS else min(self.want, BATCH_COPIES)
        while len(self.copies) < n:
            self.copies.append(self.copies[0].clone())
        return self.copies[:n]

    def release(self) -> None:
        """Frees the copies now (the kernels bound to them would keep them for the cycle collector)."""
        unbind(*self.copies[1:])
        del self.copies[1:]


def _against_dense(dense_ws: list[torch.Tensor], x: torch.Tensor, cases: dict, reps: int,
                   graphs: bool = False) -> dict:
    """{case: speedup over F.linear(x, dense_w)} for cases {case: (fns, bytes limit)}, fns one
    callable fn(x) per copy of the case's weight, timed interleaved with dense (one call per copy
    per round, dense_ws its copies). A speedup above PLAUSIBLE x its bytes limit means dense was
    disturbed (another process took a core): it is timed again, and None if it stays impossible.
    On a GPU a sample is about GPU_CALLS_PER_SAMPLE queued calls, timed until done; with `graphs`
    they are captured in a CUDA graph and replayed, as serving engines run a model (the launches'
    host time then costs nothing), and a case that cannot be captured measures 0."""
    sync, calls_per_copy = None, 1
    if x.device.type == "cuda":  # a call only queues its work: time queued calls until they finish
        sync = lambda: torch.cuda.synchronize(x.device)
        copies = min([len(dense_ws)] + [len(fns) for fns, _ in cases.values()])
        calls_per_copy = max(1, math.ceil(GPU_CALLS_PER_SAMPLE / copies))
    blocks = {"dense": [lambda wd=wd: F.linear(x, wd) for wd in dense_ws] * calls_per_copy}
    blocks.update({case: [lambda fn=fn: fn(x) for fn in fns] * calls_per_copy for case, (fns, _) in cases.items()})
    per_call = dict.fromkeys(blocks, 1)  # what a sample is divided by beyond its block's length
    uncapturable = set()
    if graphs and x.device.type == "cuda":
        with torch.cuda.device(x.device):  # the streams and the capture of x's GPU
            for name, calls in list(blocks.items()):
                replay = cuda_graph_of(calls)
                if replay is None and name == "dense":
                    raise RuntimeError("F.linear cannot be captured in a CUDA graph here: nothing to time against")
                if replay is None:
                    uncapturable.add(name)  # it would break a serving engine's graph too: never chosen
                    del blocks[name]
                else:
                    blocks[name], per_call[name] = [replay], len(calls)  # one replay runs them all
        cases = {case: v for case, v in cases.items() if case not in uncapturable}
    # about `reps` samples of each (a sample of a block already averages several calls)
    shortest = min(len(b) for b in blocks.values())
    rounds, warmup = max(5, math.ceil(reps / shortest)), 2 if shortest == 1 else 1
    for _ in range(RETRIES + 1):
        stats = compare_blocks(blocks, warmup=warmup, reps=rounds, max_seconds=2.0,
                               min_reps=max(2, math.ceil(5 / shortest)), sync=sync)
        dense = stats["dense"].median / per_call["dense"]
        ratios = {case: dense / (stats[case].median / per_call[case]) for case in cases}
        implausible = {case for case, r in ratios.items() if r > PLAUSIBLE * cases[case][1]}
        if not implausible:
            break
    return {**{case: None if case in implausible else r for case, r in ratios.items()},
            **dict.fromkeys(uncapturable, 0.0)}


def cuda_graph_of(calls: list[Callable[[], object]]) -> Callable[[], None] | None:
    """The calls captured, in order, in one CUDA graph on a side stream: its replay, or None where
    they cannot be captured. They run twice on that stream first: once as they are (compilation,
    autotuning, and the stream's workspaces stay out of the graph), once with torch's sync debug
    mode raising (process-wide, for that moment). A capture that fails leaves the process's CUDA
    random generator unusable, so what synchronises with the host is never captured; a capture
    that fails all the same (a sync the debug mode does not see) is reported with a warning."""
    side, mode = torch.cuda.Stream(), torch.cuda.get_sync_debug_mode()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for call in calls:
                call()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for call in calls:
                    call()
            except RuntimeError as e:
                if "synchroniz" not in str(e):
                    raise
                return None
    finally:
        torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            for call in calls:
                call()
    except RuntimeError as e:
        warnings.warn(f"a CUDA graph capture failed ({e}); torch's CUDA random generator may be unusable in this "
                      "process now (\"Offset increment outside graph capture\")", RuntimeWarning, stacklevel=3)
        return None
    return graph.replay


def _measure_rows(dense_w: torch.Tensor, rows: tuple[int, ...], cases_at: Callable, reps: int, use_cache: bool,
                  remeasure: bool, graphs: bool = False) -> dict[str, dict[int, float]]:
    """{case: {rows: speedup}} at each row count of `rows`, for the cases cases_at(m) lists at m rows:
    {case: (cache key, bytes limit, make)}, make(x) giving the callables fn(x) to time on x [m, K],
    one per copy of the weight. A cached case costs no timing (nor an x, nor copies); a ratio above
    the limit is reported as the limit and not cached."""
    if any(int(m) < 1 for m in rows):
        raise ValueError(f"row counts must be >= 1, got {tuple(rows)}")
    cache = _load() if use_cache and not remeasure else {}
    out: dict[str, dict[int, float]] = {}
    fresh: dict[str, float] = {}
    dense_ws = None
    for m in rows:
        cases = cases_at(m)
        todo = {case: entry for case, entry in cases.items() if entry[0] not in cache}
        for case in cases.keys() - todo.keys():
            out.setdefault(case, {})[m] = cache[cases[case][0]]
        if not todo:
            continue
        if dense_ws is None:
            dense_ws = ColdCopies(dense_w, dense_w.numel() * dense_w.element_size())
        x = torch.randn(m, dense_w.shape[1], dtype=dense_w.dtype, device=dense_w.device)
        ratios = _against_dense(dense_ws(m), x, {case: (make(x), limit) for case, (_, limit, make) in todo.items()},
                                reps, graphs)
        for case, ratio in ratios.items():
            out.setdefault(case, {})[m] = todo[case][1] if ratio is None else ratio
            if ratio:  # (0: it could not run as timed, say not inside a CUDA graph; found again next time)
                fresh[todo[case][0]] = ratio
    if fresh and use_cache:
        _store(fresh)
    return out


def measure_paths(dense_w: torch.Tensor, candidates: dict[str, SparseFormat], rows: tuple[int, ...],
                  reps: int = 15, use_cache: bool = True, remeasure: bool = False, paths: tuple[str, ...] = PATHS,
                  graphs: bool = False) -> dict[str, dict[str, dict[int, float]]]:
    """Speedup over dense (dense time / sparse time): {path: {label: {rows: speedup}}} for path
    "kernel" (every row count) and "batched" (row counts above 1). `use_cache=False` neither reads
    nor writes the cache; `remeasure=True` times every case and overwrites its entry. `graphs`: on
    a GPU, time CUDA-graph replays (see _against_dense)."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}; expected some of {PATHS}")
    dense_bytes = dense_w.numel() * dense_w.element_size()
    copies = {label: ColdCopies(w, w.nbytes) for label, w in candidates.items()}  # none made until timed

    def maker(label: str, backend: str) -> Callable:
        def make(x: torch.Tensor) -> list[Callable]:
            return [lambda x, w=w: linear(x, w, backend=backend) for w in copies[label](x.shape[0])]
        return make

    # (label, rows) where the kernel path is the batched row itself: timed once (see default_is_batched)
    same = {(label, m) for label, w in candidates.items() for m in rows
            if "batched" in paths and "kernel" in paths and default_is_batched("linear", w, dense_w, m)}

    def cases_at(m: int) -> dict:
        backends = {"kernel": "", "batched": table.batched_backend(dense_w.device.type, m) if m > 1 else None}
        return {f"{label}|{path}": (case_key(w, label, m, path, graphs), dense_bytes / w.nbytes,
                                    maker(label, backends[path]))
                for label, w in candidates.items() for path in paths
                if backends[path] is not None and not (path == "batched" and (label, m) in same)}

    try:
        timed = _measure_rows(dense_w, rows, cases_at, reps, use_cache, remeasure, graphs)
    finally:
        for c in copies.values():
            c.release()
    out = {path: {label: dict(timed.get(f"{label}|{path}", {})) for label in candidates} for path in paths}
    for label, m in same:
        if m in out["kernel"][label]:
            out["batched"][label][m] = out["kernel"][label][m]
    return out


def default_is_batched(op: str, w, dense_w: torch.Tensor, m: int) -> bool:
    """Whether the op's default backend for m rows of x (dense_w's device and dtype) is the batched
    row a layer runs above its crossover: on a GPU, formats without a kernel for many rows (bitmask
    past the GEMV's rows, CSR) take it. Its kernel and batched timings are then one timing: two of
    the same call would draw a crossover from noise alone."""
    if m <= 1:
        return False
    return default_backend(op, w, dense_w, m) == table.batched_backend(dense_w.device.type, m)


def default_backend(op: str, w, dense_w: torch.Tensor, m: int) -> str | None:
    """The name of the backend row the op runs for m rows of x on dense_w's device and dtype (what
    a layer's kernel is, in its report); None where no row takes that dtype."""
    x = torch.empty(0, device=dense_w.device, dtype=dense_w.dtype)  # select reads x's device and dtype only
    fmt = "dense" if isinstance(w, torch.Tensor) else w.format_name
    try:
        return table.select(op, fmt, x, w, m).name
    except RuntimeError:  # no row takes this dtype: the op will say so when timed
        return None


def measure(dense_w: torch.Tensor, candidates: dict[str, SparseFormat], rows: tuple[int, ...],
            reps: int = 15, use_cache: bool = True, remeasure: bool = False, graphs: bool = False
            ) -> dict[str, dict[int, float]]:
    """Speedup over dense of each candidate's sparse kernel at each row count ({label: {rows: x}})."""
    return measure_paths(dense_w, candidates, rows, reps, use_cache, remeasure, ("kernel",), graphs)["kernel"]


def measure_act(dense_w: torch.Tensor, w_t, weight_format: str, sparsity: float, rows: tuple[int, ...],
                reps: int = 15, use_cache: bool = True, remeasure: bool = False, graphs: bool = False
                ) -> dict[str, dict[int, float]]:
    """Speedup over dense F.linear of the activation-sparse op with `sparsity` of x's inputs skipped,
    its weight `w_t` ([K, N]: a tensor, or a Bitmask for weight_format "bitmask"): {path: {rows:
    speedup}} for path "kernel" (the op's default backend, every row count) and "batched" (what an
    ActSparseLinear runs above its crossover, row counts above 1; the kernel's timing where the
    kernel runs the batch itself). Cached like measure_paths."""
    k, n = w_t.shape
    density = w_t.density if weight_format == "bitmask" else 1.0
    w_bytes = w_t.nbytes if weight_format == "bitmask" else w_t.numel() * w_t.element_size()
    limit = dense_w.numel() * dense_w.element_size() / max(w_bytes * (1.0 - sparsity), 1.0)
    copies = ColdCopies(w_t, max(1, round(w_bytes * (1.0 - sparsity))))  # a call reads the active rows only
    # id(copy) -> (copy, its BoundKernel, its buffers): each bound once and kept, as an ActSparseLinear keeps it
    bindings: dict[int, tuple] = {}

    def bound_copies(m: int) -> list[tuple]:
        made = copies(m)
        for w in made:
            if id(w) not in bindings:
                buffers = tuple(w.tensors().values()) if weight_format == "bitmask" else (w,)
                bindings[id(w)] = (w, BoundKernel("act_sparse_linear", weight_format), buffers)
        return [bindings[id(w)] for w in made]

    def run(x: torch.Tensor, threshold: float, backend: str, w, bound: BoundKernel, buffers: tuple) -> torch.Tensor:
        # called as the module calls it: the bound kernel, also for a batch the kernel runs as its own
        # GEMM (the op would bind a dense w_t each time)
        if backend == "" or (backend == "batched" and kernel_takes_batch(x.dtype, x.shape[0])):
            fn = fast_kernel(bound, x, None, k, n, buffers, lambda: w, (k, n))
            if fn is not None:
                return fn(x, threshold, None)
        return act_sparse_linear(x, w, threshold, backend=backend)

    def make(backend: str) -> Callable:
        def on(x: torch.Tensor) -> list[Callable]:
            threshold = float(x.float().abs().flatten().kthvalue(max(1, round(sparsity * x.numel()))).values) \
                if sparsity > 0 else 0.0  # `sparsity` of the inputs at or below it
            return [lambda x, c=c: run(x, threshold, backend, *c) for c in bound_copies(x.shape[0])]
        return on

    # Row counts where the batched path calls the kernel itself (kernel_takes_batch), or where the
    # kernel path is the batched row (default_is_batched): one timing serves both, so that no
    # crossover is drawn between two timings of the same call.
    same = {m for m in rows if m > 1 and (default_is_batched("act_sparse_linear", w_t, dense_w, m) or (
        dense_w.device.type == "cpu" and kernel_takes_batch(dense_w.dtype, m)))}

    def cases_at(m: int) -> dict:
        batched = table.batched_backend(dense_w.device.type, m) if m > 1 and m not in same else None
        backends = {"kernel": "", "batched": batched}
        return {path: (f"{machine_key()}|{device_key(w_t.device, graphs)}|{w_t.dtype}|{n}x{k}|act-{weight_format}"
                       f"|d{density:.2f}|a{sparsity:.2f}|m{m}|{path}", limit, make(backend))
                for path, backend in backends.items() if backend is not None}

    try:
        timed = _measure_rows(dense_w, rows, cases_at, reps, use_cache, remeasure, graphs)
    finally:
        bindings.clear()
        copies.release()
    out = {path: dict(timed.get(path, {})) for path in PATHS}
    out["batched"].update({m: out["kernel"][m] for m in same if m in out["kernel"]})
    return out
