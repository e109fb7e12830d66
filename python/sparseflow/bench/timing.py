"""Interleaved timing: every callable runs once per round, rounds in a fresh order, so that a
drift of the machine (another process, clock changes, a thermal step) hits all callables alike,
and a ratio can be taken round by round (paired) instead of between two far-apart medians."""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .bandwidth import llc_bytes

FLUSH_MODES = ("torch", "numpy", "none", "layers")


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty sequence."""
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Seconds per call of one callable; `samples_ns[i]` was taken in round i."""

    samples_ns: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.samples_ns)

    @property
    def median(self) -> float:
        return quantile(self.samples_ns, 0.5) * 1e-9

    @property
    def p10(self) -> float:
        return quantile(self.samples_ns, 0.1) * 1e-9

    @property
    def p90(self) -> float:
        return quantile(self.samples_ns, 0.9) * 1e-9

    @property
    def mean(self) -> float:
        return sum(self.samples_ns) / len(self.samples_ns) * 1e-9

    @property
    def min(self) -> float:
        return min(self.samples_ns) * 1e-9

    def as_dict(self) -> dict:
        return {
            "median_s": self.median,
            "p10_s": self.p10,
            "p90_s": self.p90,
            "mean_s": self.mean,
            "min_s": self.min,
            "n": self.n,
        }


@dataclass(frozen=True)
class Ratio:
    """Paired ratio num/den: taken within each round, then summarised."""

    median: float
    p10: float
    p90: float

    def as_dict(self) -> dict:
        return {"median": self.median, "p10": self.p10, "p90": self.p90}


def paired_ratio(num: Stats, den: Stats) -> Ratio:
    """Per-round num/den of two callables timed by the same `compare` call (speedup of den over
    num when num is the baseline). Pairing cancels slow drifts that hit both within a round."""
    if num.n != den.n:
        raise ValueError(f"paired_ratio needs stats from one compare() call ({num.n} vs {den.n} samples)")
    r = [a / b for a, b in zip(num.samples_ns, den.samples_ns, strict=True) if b > 0]
    return Ratio(quantile(r, 0.5), quantile(r, 0.1), quantile(r, 0.9))


def _round_order(names: list[str], i: int, order: str, rng: random.Random, last: str | None) -> list[str]:
    if order == "rotate":
        k = i % len(names)
        seq = names[k:] + names[:k]
    elif order == "shuffle":
        seq = names[:]
        rng.shuffle(seq)
    else:
        raise ValueError(f"order must be 'shuffle' or 'rotate', got {order!r}")
    if len(seq) > 1 and seq[0] == last:
        # Never the same callable twice in a row: its data would still be in the caches.
        seq = seq[1:] + seq[:1]
    return seq


def compare(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    reps: int = 30,
    *,
    before: Callable[[], object] | None = None,
    order: str = "shuffle",
    seed: int = 0,
    max_seconds: float | None = None,
    min_reps: int = 5,
    clock: Callable[[], int] = time.perf_counter_ns,
    sync: Callable[[], object] | None = None,
) -> dict[str, Stats]:
    """Times each callable `reps` times, interleaved: one call of each per round, the rounds in
    shuffled (or rotating) order, never the same callable twice in a row. `before` runs, untimed,
    before every call (e.g. a cache flush). `warmup` untimed rounds come first. With `max_seconds`,
    timing stops early once that much wall time was spent and at least `min_reps` rounds were taken.
    Returns {name: Stats} (seconds from `clock`, time.perf_counter_ns by default: wall time).

    `clock=time.thread_time_ns` counts only the CPU time the calling thread got, which a busy
    machine does not inflate by preempting it; it is right only when all the work runs on the
    calling thread (torch.set_num_threads(1): torch and sparseflow's kernels then run inline).

    `sync` (e.g. torch.cuda.synchronize, for work that a call only queues) runs before each timed
    call and inside its timing, after it: a sample is then the time to finish the call's work."""
    if not fns:
        return {}
    names = list(fns)
    rng = random.Random(seed)
    samples: dict[str, list[int]] = {name: [] for name in names}
    last = None
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside a timed call would land on one callable only
    try:
        for i in range(warmup):
            for name in _round_order(names, i, order, rng, last):
                if before is not None:
                    before()
                fns[name]()
                last = name
        start = time.perf_counter()
        for i in range(reps):
            for name in _round_order(names, i, order, rng, last):
                if before is not None:
                    before()
                if sync is not None:
                    sync()
                t0 = clock()
                fns[name]()
                if sync is not None:
                    sync()
                samples[name].append(clock() - t0)
                last = name
            if max_seconds is not None and i + 1 >= min_reps and time.perf_counter() - start > max_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Stats(tuple(s)) for name, s in samples.items()}


MAX_COLD_COPIES = 256  # weights under cold_bytes() / 256 (256 KiB) stay partly warm


def cold_copies(w, nbytes: int, limit: int = MAX_COLD_COPIES) -> list:
    """w (a tensor or a format) and enough copies of it that cold_bytes() of the others are read
    between two calls on one, called in turn: each call then reads its weight from memory, as a
    model's next layer does, while the code and x stay as warm as between a model's layers (a full
    flush evicts those too, which costs a short call 100-150 us of code fetched from memory).
    `nbytes`: what one call reads of w. On the CPU and CUDA GPUs (elsewhere [w])."""
    return [w] + [w.clone() for _ in range(cold_copy_count(w, nbytes, limit) - 1)]


def cold_copy_count(w, nbytes: int, limit: int = MAX_COLD_COPIES) -> int:
    """How many copies of w cold_copies makes (w itself included): enough to read cold_bytes()
    between two calls on one, or on a GPU twice its L2 (50-60 MB on an H100 or H200: a layer's
    weight called back to back would be read from there, not from memory as in a model)."""
    if w.device.type == "cuda":
        cold = 2 * torch.cuda.get_device_properties(w.device).L2_cache_size
    elif w.device.type == "cpu":
        cold = cold_bytes()
    else:
        return 1
    return min(limit, 1 + math.ceil(cold / max(nbytes, 1)))


def compare_blocks(blocks: dict[str, list[Callable[[], object]]], **kwargs) -> dict[str, Stats]:
    """compare() where each entry is a block of callables run in order as one sample (e.g. one per
    cold copy of a weight); the Stats are per call: each sample divided by its block's length."""

    def run_block(calls: list[Callable[[], object]]) -> Callable[[], object]:
        if len(calls) == 1:
            return calls[0]

        def run() -> None:
            for call in calls:
                call()

        return run

    stats = compare({name: run_block(calls) for name, calls in blocks.items()}, **kwargs)
    return {name: Stats(tuple(t // len(blocks[name]) for t in s.samples_ns)) for name, s in stats.items()}


def cold_bytes() -> int:
    """Bytes that, read in between, leave nothing of earlier data in any cache: 2x the last-level
    cache, at least 64 MiB."""
    return max(64 << 20, 2 * llc_bytes())


def cache_flusher(mode: str = "torch", nbytes: int | None = None) -> Callable[[], object] | None:
    """A callable that evicts the caches by reading a buffer of 2x the last-level cache (at least
    64 MiB), or None for mode "none".

    "torch" reads with torch at the current thread count, so every core's private caches are
    swept too; it also leaves torch's OpenMP workers as a real model leaves them before a linear
    layer (busy-waiting for a while), which a kernel with its own thread pool competes with.
    "numpy" reads on the calling thread only (numpy reductions are single-threaded); it takes long
    enough that every pool has gone to sleep, so each timed call starts idle.
    "none" and "layers" give None ("layers": no flush, see bench/kernels.py)."""
    if mode in ("none", "layers"):  # "layers" keeps the weights cold by rotating copies instead (bench/kernels.py)
        return None
    if mode not in FLUSH_MODES:
        raise ValueError(f"flush mode must be one of {FLUSH_MODES}, got {mode!r}")
    size = nbytes or cold_bytes()
    buf = torch.ones(size // 8, dtype=torch.int64)
    if mode == "numpy":
        arr = buf.numpy()
        return arr.sum
    return buf.sum
