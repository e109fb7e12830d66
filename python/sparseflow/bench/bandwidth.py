"""Measured memory bandwidth of this machine, with torch at the current thread count, on buffers
much larger than the last-level cache. Kernel results are reported as a fraction of it.

Copy: `dst.copy_(src)` moves 2 * nbytes (every byte read once and written once; a CPU that
allocates on write reads dst as well, which is not counted, as STREAM does not).
Read: `x.sum()` reads nbytes: the traffic pattern of a GEMV, which is read-only on the weight.
Both are cached per process (per thread count and size): the first call takes about a second."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

DEFAULT_BYTES = 256 << 20


def llc_bytes() -> int:
    """Bytes of the last-level caches this process may run on (Linux sysfs): the largest cache
    level, each instance counted once (several L3s on a CPU with several core complexes); 32 MiB
    when it cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = [0]
    def read(path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    sizes: dict[tuple[int, str], int] = {}  # (level, the CPUs sharing it) -> bytes
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/cache"
        try:
            for entry in (os.path.join(base, e) for e in os.listdir(base) if e.startswith("index")):
                text = read(os.path.join(entry, "size")).upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                key = (int(read(os.path.join(entry, "level"))), read(os.path.join(entry, "shared_cpu_list")))
                sizes[key] = int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    if not sizes:
        return 32 << 20
    top = max(level for level, _ in sizes)
    return sum(size for (level, _), size in sizes.items() if level == top)


@dataclass(frozen=True)
class Bandwidth:
    copy_gbps: float  # (read + write) bytes per second / 1e9
    read_gbps: float  # read-only (x.sum() over a float32 buffer)
    read_bf16_gbps: float
    threads: int
    buffer_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


Clock = Callable[[], int]


def _median_seconds(fn, reps: int, clock: Clock) -> float:
    from .timing import compare  # timing imports this module for llc_bytes

    return compare({"fn": fn}, warmup=1, reps=reps, clock=clock)["fn"].median


@functools.cache
def _copy_gbps(threads: int, nbytes: int, reps: int, clock: Clock) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), reps, clock) / 1e9


@functools.cache
def _read_gbps(threads: int, nbytes: int, dtype: torch.dtype, reps: int, clock: Clock) -> float:
    x = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
    return nbytes / _median_seconds(x.sum, reps, clock) / 1e9


def copy_bandwidth(nbytes: int = DEFAULT_BYTES, reps: int = 7, clock: Clock = time.perf_counter_ns) -> float:
    """GB/s of a large torch copy (read + write counted) at torch.get_num_threads()."""
    return _copy_gbps(torch.get_num_threads(), nbytes, reps, clock)


def read_bandwidth(
    dtype: torch.dtype = torch.float32,
    nbytes: int = DEFAULT_BYTES,
    reps: int = 7,
    clock: Clock = time.perf_counter_ns,
) -> float:
    """GB/s of a large torch reduction (x.sum(), read only) at torch.get_num_threads()."""
    return _read_gbps(torch.get_num_threads(), nbytes, dtype, reps, clock)


def measure(nbytes: int = DEFAULT_BYTES, clock: Clock = time.perf_counter_ns) -> Bandwidth:
    """Copy and read bandwidth at the current thread count (cached per process). `clock` as in
    timing.compare (time.thread_time_ns only with one thread)."""
    return Bandwidth(
        copy_gbps=copy_bandwidth(nbytes, clock=clock),
        read_gbps=read_bandwidth(torch.float32, nbytes, clock=clock),
        read_bf16_gbps=read_bandwidth(torch.bfloat16, nbytes, clock=clock),
        threads=torch.get_num_threads(),
        buffer_bytes=nbytes,
    )
