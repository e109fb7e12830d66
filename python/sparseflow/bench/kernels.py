"""The kernel benchmark: every sparse backend in `sparseflow.ops.table` against dense torch
`F.linear` in the same process, dtype and thread count, timed interleaved (see timing.py).

For each case (kernel spec x shape x M x dtype) it builds random weights pruned to the spec's
pattern, checks every candidate backend of the table (all rows but `reference`) against the
reference math, `ops.linear_reference` on the dense weight the format was built from (with
--check-reference-backend also against the table's `reference` row); a wrong kernel is reported
and not timed. Then it times the kernel against dense and reports the speedup next to the
physical limit of a memory-bound GEMV, bytes(dense) / bytes(sparse), and the bandwidth reached.
Also: the speedup over torch's own CSR matmul, and the ratio at M = 16 and 128 (where each format
stops beating dense, for the dispatcher).

    python benchmarks/bench_kernels.py                # the issue's table, bf16 then fp32
    python benchmarks/bench_kernels.py --quick        # one small shape, bf16
    python -m sparseflow.bench.kernels --help         # the same CLI
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _ext, ops
from .._argtypes import fraction, list_of, non_negative_int, positive_float, positive_int
from ..formats import BSR, CSR, NM, Bitmask
from ..formats.nm import check_nm
from ..info import info
from ..io._atomic import write_result
from ..ops.bound import unbind
from . import bandwidth as bw
from .load import OtherLoad
from .timing import FLUSH_MODES, Stats, cache_flusher, cold_copies, compare_blocks, paired_ratio

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Error allowance on top of 2x torch's own dense error, relative to max |y| (as tests/conftest.py).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

KINDS = ("bitmask", "nm", "bsr", "csr", "act", "act_bitmask")


# ---------------------------------------------------------------------------------------------
# What to measure
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSpec:
    """One row of the issue's table: a weight format and sparsity (or an activation sparsity).

    kind: "bitmask" | "nm" | "bsr" | "csr" (sf.ops.linear), "act" (sf.ops.act_sparse_linear with a
    dense w_t) or "act_bitmask" (act_sparse_linear with a Bitmask w_t)."""

    kind: str
    sparsity: float = 0.0  # fraction of weights pruned (n:m: 1 - n/m)
    act_sparsity: float = 0.0  # fraction of inputs set to exactly 0 (act kinds)
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (32, 32)
    target: float | None = None  # speedup over dense the issue asks for

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def op(self) -> str:
        return "act_sparse_linear" if self.kind in ("act", "act_bitmask") else "linear"

    @property
    def format(self) -> str:
        """The format column of the backend table."""
        return {"act": "dense", "act_bitmask": "bitmask"}.get(self.kind, self.kind)

    @property
    def pattern(self) -> tuple:
        """What the pruned weight depends on (cases with equal patterns share one weight)."""
        if self.kind == "nm":
            return ("nm", self.n, self.m)
        if self.kind == "bsr":
            return ("bsr", self.sparsity, self.block)
        if self.kind == "act":
            return ("dense",)
        return ("unstructured", self.sparsity)

    @property
    def label(self) -> str:
        pct = lambda s: f"{round(s * 100):d}%"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "bsr":
            return f"bsr {self.block[0]}x{self.block[1]} {pct(self.sparsity)}"
        if self.kind == "act":
            return f"act {pct(self.act_sparsity)} (dense w_t)"
        if self.kind == "act_bitmask":
            return f"bitmask {pct(self.sparsity)} + act {pct(self.act_sparsity)}"
        return f"{self.kind} {pct(self.sparsity)}"

    @property
    def effective_sparsity(self) -> float:
        """Fraction of the weight the kernel may skip (the x axis of the plot)."""
        return 1 - (1 - self.sparsity) * (1 - self.act_sparsity)

    def same_kernel(self, other: KernelSpec) -> bool:
        return replace(self, target=None) == replace(other, target=None)


DEFAULT_SPECS: tuple[KernelSpec, ...] = (
    KernelSpec("bitmask", 0.5, target=1.6),
    KernelSpec("bitmask", 0.7, target=2.4),
    KernelSpec("nm", 0.5, n=2, m=4, target=1.6),
    KernelSpec("bsr", 0.9, block=(32, 32), target=7.0),
    KernelSpec("csr", 0.95, target=8.0),
    KernelSpec("act", act_sparsity=0.5, target=1.8),
    KernelSpec("act_bitmask", 0.5, act_sparsity=0.5, target=2.8),
)
# torch's CSR matmul baseline: every weight format at 50% sparsity, on the very same weight.
TORCH_CSR_SPECS: tuple[KernelSpec, ...] = (
    KernelSpec("bitmask", 0.5),
    KernelSpec("nm", 0.5, n=2, m=4),
    KernelSpec("bsr", 0.5, block=(32, 32)),
    KernelSpec("csr", 0.5),
)
TORCH_CSR_TARGET = 3.0
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (14336, 4096), (4096, 14336))
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((2048, 2048),)


def target_for(spec: KernelSpec) -> float | None:
    for d in DEFAULT_SPECS:
        if d.same_kernel(spec):
            return d.target
    return None


def parse_format(token: str) -> KernelSpec:
    """'bitmask' | 'csr' | 'bsr' | 'bsr16x16' | '2:4' (any n:m) | 'act' | 'act+bitmask'."""
    t = token.strip().lower().replace("_", "+").replace("-", "+")
    if t in ("bitmask", "csr"):
        return KernelSpec(t, 0.5)
    if t in ("act", "act+dense"):
        return KernelSpec("act", act_sparsity=0.5)
    if t in ("act+bitmask", "bitmask+act"):
        return KernelSpec("act_bitmask", 0.5, act_sparsity=0.5)
    if match := re.fullmatch(r"bsr(?:(\d+)x(\d+))?", t):
        block = (int(match[1]), int(match[2])) if match[1] else (32, 32)
        if 0 in block:
            raise ValueError(f"format {token!r}: block sides must be positive")
        return KernelSpec("bsr", 0.9, block=block)
    if t == "nm":
        t = "2:4"
    if match := re.fullmatch(r"(\d+):(\d+)", t):
        n, m = check_nm(int(match[1]), int(match[2]))  # before any timing, not when the case comes up
        return KernelSpec("nm", 1 - n / m, n=n, m=m)
    raise ValueError(f"unknown format {token!r}: use bitmask, csr, bsr[BMxBK], N:M, act or act+bitmask")


def make_specs(
    formats: Sequence[str] | None = None,
    sparsities: Sequence[float] | None = None,
    act_sparsity: float | None = None,
) -> list[KernelSpec]:
    """The issue's table by default. `formats` picks kernels (their table sparsities, or 50% when the
    table has none); `sparsities` replaces the weight sparsity (the input sparsity of 'act');
    n:m keeps its own. Targets come from the table where the spec is in it."""
    if not formats and sparsities is None and act_sparsity is None:
        return list(DEFAULT_SPECS)
    if formats:
        templates = [parse_format(f) for f in formats]
        chosen: list[KernelSpec] = []
        for t in templates:
            same = [
                d
                for d in DEFAULT_SPECS
                if d.kind == t.kind
                and (t.kind != "nm" or (d.n, d.m) == (t.n, t.m))
                and (t.kind != "bsr" or d.block == t.block)
            ]
            chosen.extend(same or [t])
    else:
        chosen = list(DEFAULT_SPECS)
    specs: list[KernelSpec] = []
    for s in chosen:
        if act_sparsity is not None and s.kind in ("act", "act_bitmask"):
            s = replace(s, act_sparsity=act_sparsity)
        if sparsities is None or s.kind == "nm":
            variants = [s]
        elif s.kind == "act":
            if act_sparsity is not None:
                raise ValueError("for the act format --sparsity is its input sparsity: give --sparsity or "
                                 "--act-sparsity, not both")
            variants = [replace(s, act_sparsity=v) for v in sparsities]
        else:
            variants = [replace(s, sparsity=v) for v in sparsities]
        for v in variants:
            v = replace(v, target=target_for(v))
            if not any(v.same_kernel(o) for o in specs):
                specs.append(v)
    return specs


@dataclass
class Options:
    shapes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    specs: list[KernelSpec] = field(default_factory=lambda: list(DEFAULT_SPECS))
    dtypes: list[torch.dtype] = field(default_factory=lambda: [torch.bfloat16, torch.float32])
    ms: list[int] = field(default_factory=lambda: [1])
    crossover_ms: list[int] = field(default_factory=lambda: [16, 128])  # on the first shape
    reps: int = 30
    warmup: int = 2
    max_seconds: float = 1.0  # per case: stop after this much timing (at least 5 rounds)
    flush: str = "layers"
    stat: str = "median"  # what the speedup is: "median" (of paired per-round ratios) or "min"
    clock: str = "wall"  # "wall" (perf_counter) or "thread" (CPU time of the calling thread; 1 thread only)
    torch_csr: str = "first"  # shapes compared with torch's CSR matmul: "first" | "all" | "none"
    check_table_reference: bool = False  # also check against the table's `reference` backend (slow)
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def quick(cls, **kw) -> Options:
        return cls(
            **{"shapes": list(QUICK_SHAPES), "dtypes": [torch.bfloat16], "reps": 15, "max_seconds": 0.5, **kw}
        )


# ---------------------------------------------------------------------------------------------
# Weights and inputs
# ---------------------------------------------------------------------------------------------
def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """Random values are never exactly 0 (fp16 underflow could make some): 0 means pruned."""
    return t.masked_fill_(t == 0, 1.0)


class Workload:
    """Random weights and inputs of one shape (N, K), pruned to each spec's pattern, cached so that
    specs with the same pattern share the weight. Weights are drawn and compressed once, in
    float32; other dtypes are casts of those (`SparseFormat.to(dtype=...)` casts the values only),
    so bf16 and fp32 measure the same weights and the slow compression runs once per shape."""

    def __init__(self, n: int, k: int, seed: int = 0, device: str = "cpu"):
        self.n, self.k, self.seed, self.device = n, k, seed, device
        self._cache: dict = {}

    def _gen(self, *key) -> torch.Generator:
        text = f"{self.seed}/{self.n}x{self.k}/{key}"
        return torch.Generator().manual_seed(zlib.crc32(text.encode()))

    def _cached(self, key, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The unpruned random weight [N, K]."""
        if dtype != torch.float32:
            return self._cached(("dense", dtype), lambda: self.dense().to(dtype))
        return self._cached(
            ("dense", dtype),
            lambda: _nonzero(torch.randn(self.n, self.k, generator=self._gen("dense"))).to(self.device),
        )

    def pruned(self, spec: KernelSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] with the spec's pattern of zeros (the dense baseline's weight)."""
        if dtype != torch.float32:
            return self._cached(("pruned", spec.pattern, dtype), lambda: self.pruned(spec).to(dtype))
        return self._cached(("pruned", spec.pattern, dtype), lambda: self._prune(spec))

    def _prune(self, spec: KernelSpec) -> torch.Tensor:
        w, (n, k), g = self.dense(), (self.n, self.k), self._gen(*spec.pattern)
        kind = spec.pattern[0]
        if kind == "dense":
            return w
        if kind == "unstructured":
            keep = torch.rand(n, k, generator=g) >= spec.sparsity
        elif kind == "nm":
            # A uniformly random choice of n of every m positions (random weights: as magnitude pruning).
            combos = torch.tensor(list(itertools.combinations(range(spec.m), spec.n)))
            table = torch.zeros(len(combos), spec.m, dtype=torch.bool).scatter_(1, combos, True)
            groups = -(-k // spec.m)
            keep = table[torch.randint(len(combos), (n, groups), generator=g)].view(n, -1)[:, :k]
        else:  # block: whole blocks kept or dropped
            bm, bk = spec.block
            # exactly the nearest whole number of blocks (at least one below 100%): a per-block coin
            # left a one-block weight all zeros half the time
            rows, cols = -(-n // bm), -(-k // bk)
            count = 0 if spec.sparsity >= 1 else max(1, round((1 - spec.sparsity) * rows * cols))
            kept = torch.zeros(rows * cols, dtype=torch.bool)
            kept[torch.randperm(rows * cols, generator=g)[:count]] = True
            keep = kept.view(rows, cols).repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
        return torch.where(keep.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))

    def weight(self, spec: KernelSpec, dtype: torch.dtype = torch.float32):
        """What the sparse op takes: a format object, or w_t [K, N] for the act kinds."""
        key = ("weight", spec.kind, spec.pattern, dtype)
        if dtype != torch.float32:
            w32 = self.weight(spec)
            return self._cached(
                key, lambda: w32.to(dtype) if isinstance(w32, torch.Tensor) else w32.to(dtype=dtype)
            )

        def make():
            p = self.pruned(spec)
            if spec.kind == "bitmask":
                return Bitmask.from_dense(p)
            if spec.kind == "csr":
                return CSR.from_dense(p)
            if spec.kind == "bsr":
                return BSR.from_dense(p, block=spec.block)
            if spec.kind == "nm":
                return NM.from_dense(p, n=spec.n, m=spec.m)
            if spec.kind == "act":
                return p.t().contiguous()
            return Bitmask.from_dense(p.t().contiguous())

        return self._cached(key, make)

    def x(self, m: int, act_sparsity: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Input [M, K]; with act_sparsity, exactly that fraction of each row is 0."""

        def make():
            g = self._gen("x", m, act_sparsity)
            x = _nonzero(torch.randn(m, self.k, generator=g)).to(dtype)
            zeros = round(act_sparsity * self.k)
            if zeros:
                idx = torch.rand(m, self.k, generator=g).argsort(1)[:, :zeros]
                x.scatter_(1, idx, 0.0)
            return x.to(self.device)

        return self._cached(("x", m, act_sparsity, dtype), make)


# ---------------------------------------------------------------------------------------------
# Bytes a memory-bound GEMV has to move
# ---------------------------------------------------------------------------------------------
def io_bytes(x: torch.Tensor, n_out: int) -> int:
    return x.numel() * x.element_size() + x.shape[0] * n_out * x.element_size()


def active_inputs(x: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """bool [K]: inputs that some row of x uses (the rows of w_t an act-sparse kernel reads)."""
    return (~(x.abs() <= threshold)).any(0)


def sparse_bytes(spec: KernelSpec, w, x: torch.Tensor, threshold: float = 0.0) -> int:
    """Weight bytes the kernel must read (all buffers of the format, or for the act kinds only the
    rows of w_t of active inputs, with their metadata) plus x and y."""
    if spec.op == "linear":
        return w.nbytes + io_bytes(x, w.shape[0])
    active = active_inputs(x, threshold)
    n_out = w.shape[1]
    if isinstance(w, torch.Tensor):
        return int(active.sum()) * n_out * w.element_size() + io_bytes(x, n_out)
    per_row_values = w.row_offsets.diff()
    values = int(per_row_values[active.to(per_row_values.device)].sum()) * w.values.element_size()
    meta = int(active.sum()) * (w.mask.shape[1] + w.row_offsets.element_size())
    return values + meta + io_bytes(x, n_out)


def dense_bytes(w_dense: torch.Tensor, x: torch.Tensor) -> int:
    return w_dense.numel() * w_dense.element_size() + io_bytes(x, w_dense.shape[0])


def analytic_limit(spec: KernelSpec, n: int, k: int, dtype: torch.dtype, m: int = 1) -> float:
    """bytes(dense) / bytes(sparse) from the formats' layouts (no weight needed): the limit line of
    the plot. Agrees with the measured nbytes up to the randomness of the pattern."""
    e = torch.empty((), dtype=dtype).element_size()
    io = (m * k + m * n) * e
    keep, a = 1 - spec.sparsity, 1 - spec.act_sparsity
    if spec.kind == "bitmask":
        w = keep * n * k * e + n * -(-k // 8) + 8 * (n + 1)
    elif spec.kind == "csr":
        w = keep * n * k * (e + (2 if k <= 65536 else 4)) + 8 * (n + 1)
    elif spec.kind == "bsr":
        bm, bk = spec.block
        rows, cols = -(-n // bm), -(-k // bk)
        blocks = keep * rows * cols
        w = blocks * (bm * bk * e + 4) + 8 * (rows + 1)
    elif spec.kind == "nm":
        per_row = -(-k // spec.m) * spec.n
        w = n * (per_row * e + -(-per_row * (2 if spec.m == 4 else 4) // 8))
    elif spec.kind == "act":
        w = a * k * n * e
    else:  # act_bitmask: w_t is [K, N]
        w = a * (keep * k * n * e + k * (-(-n // 8) + 8))
    return (n * k * e + io) / (w + io)


# ---------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------
def candidates(spec: KernelSpec, x: torch.Tensor, w, m: int) -> list[ops.table.Backend]:
    """The backends of the table to time: every row of the op and format on x's device that is
    not the reference, can run here, takes the dtype and applies to this weight and M."""
    return [
        b
        for b in ops.table.backends(spec.op, spec.format, x.device.type)
        if b.name != "reference" and x.dtype in b.dtypes and b.available() and b.applies(w, m)
    ]


def op_call(
    spec: KernelSpec, x: torch.Tensor, w, backend: str, threshold: float = 0.0
) -> Callable[[], torch.Tensor]:
    """The public op with the backend forced: what a user's model calls."""
    if spec.op == "linear":
        return lambda: ops.linear(x, w, backend=backend)
    return lambda: ops.act_sparse_linear(x, w, threshold, backend=backend)


def kernel_call(spec: KernelSpec, b: ops.table.Backend, x: torch.Tensor, w, threshold: float = 0.0):
    """The backend's function itself, without the custom-op layer (to show that layer's cost)."""
    if spec.op == "linear":
        return lambda: b.fn(x, w, None)
    return lambda: b.fn(x, w, threshold, None)


@contextlib.contextmanager
def poisoned_outputs(b: ops.table.Backend) -> Iterator[None]:
    """Backends whose module has POISON_OUTPUTS (ops/cpu.py) fill outputs with NaN first, so an
    element the kernel does not write fails the check."""
    module = sys.modules.get(getattr(b.fn, "__module__", ""), None)
    if module is None or not hasattr(module, "POISON_OUTPUTS"):
        yield
        return
    old = module.POISON_OUTPUTS
    module.POISON_OUTPUTS = True
    try:
        yield
    finally:
        module.POISON_OUTPUTS = old


def check_output(
    y: torch.Tensor, y_ref: torch.Tensor, y_dense: torch.Tensor
) -> tuple[bool, float, float, str]:
    """The tests' idiom: error against the reference at most twice torch dense's, plus an atol
    scaled by max |y|. Returns (ok, error, tolerance, message)."""
    if tuple(y.shape) != tuple(y_ref.shape) or y.dtype != y_ref.dtype:
        return (
            False,
            math.inf,
            0.0,
            f"output {tuple(y.shape)} {y.dtype}, expected {tuple(y_ref.shape)} {y_ref.dtype}",
        )
    ref = y_ref.double()
    if torch.isnan(y).any() and not torch.isnan(ref).any():
        return False, math.inf, 0.0, "NaN in the output (an element was not written)"
    scale = max(1.0, ref.abs().max().item())
    err = (y.double() - ref).abs().max().item()
    base = (y_dense.double() - ref).abs().max().item()
    tol = 2 * base + ATOL[y.dtype] * scale
    return err <= tol, err, tol, "" if err <= tol else f"max error {err:.3g} > tolerance {tol:.3g}"


@dataclass
class Result:
    """One backend on one case. Times in seconds; ratio = dense / sparse (paired median)."""

    kernel: str
    kind: str
    op: str
    format: str
    backend: str
    n: int
    k: int
    m: int
    dtype: str
    sparsity: float
    act_sparsity: float
    density: float  # stored fraction of the weight (act: fraction of active inputs)
    target: float | None
    status: str  # "ok" | "wrong" | "error" | "no backend"
    message: str = ""
    error: float | None = None
    tolerance: float | None = None
    dense_s: float | None = None
    dense_p10_s: float | None = None
    dense_p90_s: float | None = None
    sparse_s: float | None = None
    sparse_p10_s: float | None = None
    sparse_p90_s: float | None = None
    kernel_s: float | None = None  # backend fn called directly (no custom-op layer)
    overhead_s: float | None = None  # sparse_s - kernel_s
    ratio: float | None = None  # the headline speedup: ratio_median or ratio_min (Options.stat)
    ratio_median: float | None = None  # median over rounds of dense / sparse within the round
    ratio_p10: float | None = None
    ratio_p90: float | None = None
    ratio_min: float | None = None  # best dense / best sparse: robust to a busy machine
    bytes_sparse: int | None = None
    bytes_dense: int | None = None
    limit: float | None = None
    frac_limit: float | None = None
    gbps: float | None = None
    dense_gbps: float | None = None
    pct_copy_bw: float | None = None
    pct_read_bw: float | None = None
    meets_target: bool | None = None
    above_limit: bool | None = None  # faster than the bytes allow: caches or a measuring error
    noisy: bool | None = None  # p90 / p10 of dense or sparse above NOISY_SPREAD
    reps: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _base_result(
    spec: KernelSpec,
    n: int,
    k: int,
    m: int,
    dtype: torch.dtype,
    backend: str,
    density: float,
    status: str,
    message: str = "",
) -> Result:
    return Result(
        kernel=spec.label,
        kind=spec.kind,
        op=spec.op,
        format=spec.format,
        backend=backend,
        n=n,
        k=k,
        m=m,
        dtype=DTYPE_NAMES[dtype],
        sparsity=spec.sparsity,
        act_sparsity=spec.act_sparsity,
        density=density,
        target=spec.target,
        status=status,
        message=message,
    )


NOISY_SPREAD = 1.5
CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass
class Context:
    options: Options
    bandwidth: bw.Bandwidth
    flush: Callable[[], object] | None

    def seconds(self, s: Stats) -> float:
        return s.min if self.options.stat == "min" else s.median

    def speedup(self, base: Stats, s: Stats) -> float:
        return base.min / s.min if self.options.stat == "min" else paired_ratio(base, s).median

    def copies(self, w, nbytes: int) -> list:
        """The weights a timed sample goes through: w alone, or in "layers" mode w and its cold
        copies (timing.cold_copies), `nbytes` being what one call reads of it."""
        return cold_copies(w, nbytes) if self.options.flush == "layers" else [w]

    def compare(self, fns: dict[str, Callable[[], object] | list[Callable[[], object]]],
                warmup: int | None = None) -> dict[str, Stats]:
        """Times the callables interleaved; a list of callables is one block, called in order
        within a sample, and its times are per call (timing.compare_blocks)."""
        o = self.options
        return compare_blocks(
            {name: f if isinstance(f, list) else [f] for name, f in fns.items()},
            warmup=o.warmup if warmup is None else min(warmup, o.warmup),
            reps=o.reps,
            before=self.flush,
            seed=o.seed,
            max_seconds=o.max_seconds,
            clock=CLOCKS[o.clock],
        )


def reference_output(spec: KernelSpec, x: torch.Tensor, w_dense: torch.Tensor, threshold: float = 0.0):
    """The op's reference implementation (the math of the table's `reference` rows) applied to
    the dense weight the compressed one was built from: a compression bug shows up here too, and
    it skips the decompression the `reference` backend does on every call (seconds at 14336x4096)."""
    if spec.op == "linear":
        return ops.linear_reference(x, w_dense, None)
    return ops.act_sparse_linear_reference(x, w_dense.t(), threshold, None)


def measure_case(spec: KernelSpec, wl: Workload, m: int, dtype: torch.dtype, ctx: Context) -> list[Result]:
    """Checks and times every candidate backend of one case against dense F.linear."""
    n, k = wl.n, wl.k
    threshold = 0.0
    w = wl.weight(spec, dtype)
    x = wl.x(m, spec.act_sparsity, dtype)
    w_dense = wl.pruned(spec, dtype)
    density = float(active_inputs(x, threshold).float().mean()) if spec.kind == "act" else w.density
    if spec.kind == "act_bitmask":
        density *= float(active_inputs(x, threshold).float().mean())
    backends = candidates(spec, x, w, m)
    if not backends:
        return [
            _base_result(
                spec,
                n,
                k,
                m,
                dtype,
                "-",
                density,
                "no backend",
                f"no {spec.op}/{spec.format} backend for {DTYPE_NAMES[dtype]} on {x.device.type}",
            )
        ]
    y_ref = reference_output(spec, x, w_dense, threshold)
    y_table_ref = op_call(spec, x, w, "reference", threshold)() if ctx.options.check_table_reference else None
    y_dense = F.linear(x, w_dense)
    b_dense = dense_bytes(w_dense, x)
    b_sparse = sparse_bytes(spec, w, x, threshold)
    # The direct call gets its own copy of the weight only when nothing keeps the weights cold
    # (it would find the weight in the caches); a copy sits elsewhere in memory, which alone moves
    # the time by a few percent, so with a flush both use the same buffers. In "layers" mode both
    # rotate through the same copies: each was read 2x the LLC ago either way.
    w_copy = w.clone() if m == 1 and ctx.options.flush == "none" else w
    dense_ws, sparse_ws = ctx.copies(w_dense, b_dense), ctx.copies(w, b_sparse)  # by the bytes a call reads
    kernel_ws = sparse_ws if len(sparse_ws) > 1 else [w_copy]
    results = []
    for b in backends:
        r = _base_result(spec, n, k, m, dtype, b.key, density, "ok")
        try:
            with poisoned_outputs(b):
                y = op_call(spec, x, w, b.name, threshold)()
            ok, r.error, r.tolerance, r.message = check_output(y, y_ref, y_dense)
            if ok and y_table_ref is not None:
                ok, _, _, message = check_output(y, y_table_ref, y_dense)
                r.message = "" if ok else f"against the reference backend: {message}"
        except Exception as e:  # a crashing kernel is a result to report, not a reason to stop
            ok, r.message = False, f"{type(e).__name__}: {e}"
            r.status = "error"
        if not ok:
            r.status = "wrong" if r.status == "ok" else r.status
            results.append(r)
            continue
        fns = {"dense": [lambda wd=wd: F.linear(x, wd) for wd in dense_ws],
               "sparse": [op_call(spec, x, ws, b.name, threshold) for ws in sparse_ws]}
        if m == 1:  # the op layer's cost per call only matters where a call is short
            fns["kernel"] = [kernel_call(spec, b, x, ws, threshold) for ws in kernel_ws]
        stats = ctx.compare(fns, warmup=None if m == 1 else 1)
        d, s = stats["dense"], stats["sparse"]
        paired = paired_ratio(d, s)
        r.dense_s, r.dense_p10_s, r.dense_p90_s = ctx.seconds(d), d.p10, d.p90
        r.sparse_s, r.sparse_p10_s, r.sparse_p90_s = ctx.seconds(s), s.p10, s.p90
        if "kernel" in stats:
            r.kernel_s = ctx.seconds(stats["kernel"])
            r.overhead_s = s.min - stats["kernel"].min  # a fixed cost: the best times show it most clearly
        r.ratio_median, r.ratio_p10, r.ratio_p90 = paired.median, paired.p10, paired.p90
        r.ratio_min = d.min / s.min
        r.ratio = ctx.speedup(d, s)
        r.bytes_sparse, r.bytes_dense = b_sparse, b_dense
        r.limit = b_dense / b_sparse
        r.frac_limit = r.ratio / r.limit
        r.gbps = b_sparse / r.sparse_s / 1e9
        r.dense_gbps = b_dense / r.dense_s / 1e9
        r.pct_copy_bw = 100 * r.gbps / ctx.bandwidth.copy_gbps
        r.pct_read_bw = 100 * r.gbps / ctx.bandwidth.read_gbps
        r.meets_target = None if spec.target is None else r.ratio >= spec.target
        r.above_limit = r.ratio > 1.1 * r.limit
        r.noisy = max(d.p90 / d.p10, s.p90 / s.p10) > NOISY_SPREAD
        r.reps = s.n
        results.append(r)
    unbind(*sparse_ws[1:])  # the copies keep their bound kernels: free them now, not at the next collection
    return results


# ---------------------------------------------------------------------------------------------
# torch's own CSR matmul
# ---------------------------------------------------------------------------------------------
def torch_csr_matmul(
    w_dense: torch.Tensor, x: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], torch.dtype]:
    """y = x @ W.T with W a torch.sparse_csr tensor, in x's dtype if torch's CSR matmul takes it,
    else in float32 (torch's CPU CSR matmul goes through MKL, which has no bf16/fp16)."""
    dtype = x.dtype if _torch_csr_takes(x.dtype) else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR tensor support is in beta"
        w_csr = w_dense.to(dtype).to_sparse_csr()
    xt = x.to(dtype).t().contiguous()
    fn = lambda: torch.sparse.mm(w_csr, xt).t()
    fn()
    return fn, dtype


def _torch_csr_takes(dtype: torch.dtype) -> bool:
    """Whether torch's CPU CSR matmul runs in dtype (tried on a tiny matrix)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.sparse.mm(torch.eye(4, dtype=dtype).to_sparse_csr(), torch.ones(4, 1, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@dataclass
class TorchCsrResult:
    kernel: str
    backend: str
    n: int
    k: int
    m: int
    dtype: str  # of our kernel and of dense
    torch_dtype: str  # of torch's CSR matmul
    torch_call: str
    sparse_s: float
    torch_s: float
    dense_s: float
    speedup: float  # torch CSR time / our time (paired median)
    dense_over_torch: float  # how torch's CSR does against its own dense
    target: float = TORCH_CSR_TARGET
    meets_target: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def measure_torch_csr(
    spec: KernelSpec, wl: Workload, m: int, dtype: torch.dtype, ctx: Context
) -> list[TorchCsrResult]:
    x, w, w_dense = wl.x(m, 0.0, dtype), wl.weight(spec, dtype), wl.pruned(spec, dtype)
    torch_fn, torch_dtype = torch_csr_matmul(w_dense, x)
    out = []
    sparse_ws, dense_ws = ctx.copies(w, sparse_bytes(spec, w, x)), ctx.copies(w_dense, dense_bytes(w_dense, x))
    for b in candidates(spec, x, w, m):
        with poisoned_outputs(b):
            y = op_call(spec, x, w, b.name)()
        ok, *_ = check_output(y, reference_output(spec, x, w_dense), F.linear(x, w_dense))
        if not ok:
            continue  # the main table reports it
        fns = {
            "torch_csr": torch_fn,  # 10-100x slower: its weight is read cold anyway
            "sparse": [op_call(spec, x, ws, b.name) for ws in sparse_ws],
            "dense": [lambda wd=wd: F.linear(x, wd) for wd in dense_ws],
        }
        stats = ctx.compare(fns, warmup=1)  # torch's CSR takes 10-100x longer than our kernels
        speed = ctx.speedup(stats["torch_csr"], stats["sparse"])
        out.append(
            TorchCsrResult(
                kernel=spec.label,
                backend=b.key,
                n=wl.n,
                k=wl.k,
                m=m,
                dtype=DTYPE_NAMES[dtype],
                torch_dtype=DTYPE_NAMES[torch_dtype],
                torch_call="torch.sparse.mm(W_csr, x.T).T",
                sparse_s=ctx.seconds(stats["sparse"]),
                torch_s=ctx.seconds(stats["torch_csr"]),
                dense_s=ctx.seconds(stats["dense"]),
                speedup=speed,
                dense_over_torch=ctx.speedup(stats["torch_csr"], stats["dense"]),
                meets_target=speed >= TORCH_CSR_TARGET,
            )
        )
    unbind(*sparse_ws[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Crossover in M
# ---------------------------------------------------------------------------------------------
def crossover_m(ratios: dict[int, float]) -> tuple[float | None, str]:
    """Where the speedup over dense falls through 1, log-log interpolated between measured M.
    Returns (M or None, a sentence for the table)."""
    ms = sorted(ratios)
    if all(ratios[m] >= 1 for m in ms):
        return None, f"beats dense at every measured M (up to {ms[-1]})"
    if ratios[ms[0]] < 1:
        return None, f"slower than dense already at M={ms[0]}"
    for lo, hi in itertools.pairwise(ms):
        if ratios[lo] >= 1 > ratios[hi]:
            a, b = math.log(ratios[lo]), math.log(ratios[hi])
            t = a / (a - b) if a != b else 0.0
            at = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
            return at, f"stops beating dense at M~{at:.0f} (between {lo} and {hi})"
    return None, "no crossing"


def crossover_rows(results: Sequence[Result]) -> list[dict]:
    groups: dict[tuple, dict[int, float]] = {}
    for r in results:
        if r.status == "ok" and r.ratio is not None:
            groups.setdefault((r.kernel, r.backend, r.n, r.k, r.dtype), {})[r.m] = r.ratio
    rows = []
    for (kernel, backend, n, k, dtype), ratios in groups.items():
        if len(ratios) < 2:
            continue
        at, note = crossover_m(ratios)
        rows.append(
            {
                "kernel": kernel,
                "backend": backend,
                "n": n,
                "k": k,
                "dtype": dtype,
                "ratios": {str(m): ratios[m] for m in sorted(ratios)},
                "crossover_m": at,
                "note": note,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
def _plan(options: Options) -> list[tuple[tuple[int, int], list[int], bool]]:
    """(shape, Ms, with torch CSR) per shape; the crossover Ms and torch's CSR on the first shape."""
    plan = []
    for i, shape in enumerate(options.shapes):
        ms = sorted(set(options.ms) | (set(options.crossover_ms) if i == 0 else set()))
        csr = 1 in ms and (options.torch_csr == "all" or (options.torch_csr == "first" and i == 0))
        plan.append((shape, ms, csr))
    return plan


def _fmt_progress(r: Result) -> str:
    where = f"{r.kernel:<24} {r.n}x{r.k} M={r.m} {r.dtype} {r.backend}"
    if r.status != "ok":
        return f"{where}: {r.status.upper()} {r.message}"
    return (
        f"{where}: {r.ratio:.2f}x (limit {r.limit:.2f}x) dense {r.dense_s * 1e3:.3f} ms "
        f"sparse {r.sparse_s * 1e3:.3f} ms"
    )


def run(options: Options, command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Runs every case at the current thread count and ISA; returns the report (JSON-ready)."""
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    others = OtherLoad()
    if options.clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("clock 'thread' times the calling thread only: it needs 1 thread (--threads 1)")
    bandwidth = bw.measure(clock=CLOCKS[options.clock])
    log(
        f"bandwidth: copy {bandwidth.copy_gbps:.1f} GB/s, read {bandwidth.read_gbps:.1f} GB/s "
        f"({bandwidth.threads} threads)"
    )
    ctx = Context(options, bandwidth, cache_flusher(options.flush))
    plan = _plan(options)
    total = sum(len(ms) * len(options.specs) for _, ms, _ in plan) * len(options.dtypes)
    results: list[Result] = []
    torch_csr: list[TorchCsrResult] = []
    done = 0
    for (n, k), ms, with_torch_csr in plan:
        wl = Workload(n, k, options.seed, options.device)  # one set of weights per shape, for every dtype
        for dtype in options.dtypes:
            for m in ms:
                for spec in options.specs:
                    done += 1
                    for r in measure_case(spec, wl, m, dtype, ctx):
                        results.append(r)
                        log(f"[{done}/{total} {time.perf_counter() - start:4.0f}s] {_fmt_progress(r)}")
            if with_torch_csr:
                for spec in TORCH_CSR_SPECS:
                    for t in measure_torch_csr(spec, wl, 1, dtype, ctx):
                        torch_csr.append(t)
                        elapsed = time.perf_counter() - start
                        log(
                            f"[torch CSR {elapsed:4.0f}s] {t.kernel:<14} {n}x{k} {t.dtype}: ours "
                            f"{t.speedup:.1f}x faster (torch in {t.torch_dtype}: {t.torch_s * 1e3:.2f} ms)"
                        )
        del wl
    # Tables read best by dtype, then shape (the loop goes by shape to build each weight once).
    order = {d: i for i, d in enumerate(DTYPE_NAMES[d] for d in options.dtypes)}
    results.sort(key=lambda r: order[r.dtype])
    torch_csr.sort(key=lambda t: order[t.dtype])
    about = info()
    meta = {
        "cpu": about["cpu"],
        "threads": torch.get_num_threads(),
        "isa": about["isa_in_use"],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": about["torch"],
        "sparseflow": about["sparseflow"],
        "python": platform.python_version(),
        "command": command,
        "ms": options.ms,
        "crossover_ms": options.crossover_ms,
        "flush": options.flush,
        "stat": options.stat,
        "clock": options.clock,
        "reps": options.reps,
        "warmup": options.warmup,
        "max_seconds_per_case": options.max_seconds,
        "seed": options.seed,
        "llc_bytes": bw.llc_bytes(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "other_cores": others.cores(),  # CPU other processes took, on average (bench/load.py)
        "elapsed_s": time.perf_counter() - start,
    }
    return {
        "meta": meta,
        "bandwidth": bandwidth.as_dict(),
        "results": [r.as_dict() for r in results],
        "torch_csr": [t.as_dict() for t in torch_csr],
        "crossover": crossover_rows(results),
    }


# ---------------------------------------------------------------------------------------------
# Command line (benchmarks/bench_kernels.py and a future `sparseflow bench kernels` call main)
# ---------------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"shape must be NxK (out x in features), got {text!r}")
    if int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"shape sides must be at least 1, got {text!r}")
    return int(match[1]), int(match[2])


def _flatten(groups) -> list | None:
    return None if groups is None else [v for g in groups for v in g]


def build_parser(default_json: str | Path | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Sparse kernels vs dense torch F.linear (same dtype and threads), "
        "interleaved medians, with the bytes ratio as the physical limit.",
    )
    p.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="NxK",
        help="weight shape, out x in features (repeatable; default: 4096x4096, 14336x4096, 4096x14336)",
    )
    p.add_argument(
        "--format",
        action="append",
        type=list_of(str),
        metavar="FMT",
        help="bitmask, csr, bsr[BMxBK], N:M (e.g. 2:4), act, act+bitmask (repeatable or comma list; "
        "default: the issue's table)",
    )
    p.add_argument(
        "--sparsity",
        action="append",
        type=list_of(fraction),
        metavar="S",
        help="weight sparsity, e.g. 0.5,0.7,0.9 (for 'act' the input sparsity; n:m keeps its own)",
    )
    p.add_argument(
        "--act-sparsity", type=fraction, help="fraction of inputs set to 0 for act kernels (default 0.5)"
    )
    p.add_argument(
        "--dtype",
        action="append",
        type=list_of(str),
        metavar="DT",
        help="bf16, fp32, fp16 (repeatable or comma list; default: bf16,fp32)",
    )
    p.add_argument("--threads", type=non_negative_int,
                   help="torch.set_num_threads (kernels use the same count; 0: torch's)")
    p.add_argument("--m", type=list_of(positive_int), metavar="M,...", help="rows of x for every shape (default 1)")
    p.add_argument(
        "--crossover-m",
        type=list_of(positive_int),
        metavar="M,...",
        help="extra M on the first shape for the crossover table (default 16,128; '' for none)",
    )
    p.add_argument("--isa", choices=_ext.ISA_LEVELS, help="force the kernels' ISA level")
    p.add_argument("--quick", action="store_true", help="one 2048x2048 shape, bf16, fewer repetitions")
    p.add_argument("--reps", type=positive_int, help="timed rounds per case (default 30, quick 15)")
    p.add_argument("--warmup", type=non_negative_int, help="untimed rounds per case (default 2)")
    p.add_argument("--max-seconds", type=positive_float, help="stop timing a case after this long (default 1.0)")
    p.add_argument(
        "--flush",
        choices=FLUSH_MODES,
        default="layers",
        help="how each timed call finds the caches. 'layers' (default): each round calls every function "
        "on a block of copies of its weight (2x the LLC in all), so weights are read cold while code and x "
        "stay warm, as between a model's layers. 'torch' / 'numpy': a full cache flush before every call, "
        "code included (timing.cache_flusher); 'none': warm",
    )
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="speedup from the median of paired per-round ratios (default) or from the best times "
        "(min: for a machine other processes keep busy); the JSON has both",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time (default) or the calling thread's CPU time, which other processes on a busy "
        "machine do not inflate (needs --threads 1)",
    )
    p.add_argument(
        "--torch-csr",
        choices=("first", "all", "none"),
        default="first",
        help="shapes to compare with torch's CSR matmul at M=1 (default: the first shape)",
    )
    p.add_argument(
        "--check-reference-backend",
        action="store_true",
        help="also check against the table's `reference` backend (it decompresses on every call: slow)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        default=None if default_json is None else str(default_json),
        metavar="PATH",
        help=f"write the report as JSON to PATH ('-' for stdout, '' for none; default {default_json})",
    )
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    p.add_argument(
        "--plot", metavar="FILE", help="speedup vs sparsity per format with the limit line (matplotlib)"
    )
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    o = Options.quick() if args.quick else Options()
    if args.shape:
        o.shapes = list(args.shape)
    formats, sparsities = _flatten(args.format), _flatten(args.sparsity)
    o.specs = make_specs(formats, sparsities, args.act_sparsity)
    if args.dtype:
        try:
            o.dtypes = [DTYPES[d.strip().lower()] for d in _flatten(args.dtype)]
        except KeyError as e:
            raise ValueError(f"unknown dtype {e}; use one of {', '.join(DTYPES)}") from None
    if args.m:
        o.ms = args.m
    if args.crossover_m is not None:
        o.crossover_ms = args.crossover_m
    for name in ("reps", "warmup", "max_seconds"):
        if getattr(args, name) is not None:
            setattr(o, name, getattr(args, name))
    o.flush, o.stat, o.clock, o.torch_csr, o.seed = (
        args.flush,
        args.stat,
        args.clock,
        args.torch_csr,
        args.seed,
    )
    if o.clock == "thread" and (args.threads or torch.get_num_threads()) != 1:
        raise ValueError("--clock thread measures the calling thread only; use it with --threads 1")
    o.check_table_reference = args.check_reference_backend
    return o


def _check_before_running(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors found before minutes of timing, not after: more threads than this process may run
    on (dense torch then slows many times over, and every ratio is wrong), and an output path that
    cannot be written."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads and args.threads > cpus:
        parser.error(f"--threads {args.threads}: this process may run on {cpus} CPUs; more threads than that "
                     "oversubscribe the cores, which slows dense torch (the baseline) many times over")
    for option, value in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if not value or value == "-":
            continue
        path = Path(value)
        if path.is_dir():
            parser.error(f"{option} {value}: is a directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"{option} {value}: cannot create {path.parent}: {e.strerror or e}")
        if not os.access(path.parent, os.W_OK):
            parser.error(f"{option} {value}: {path.parent} is not writable")


def main(
    argv: Sequence[str] | None = None, default_json: str | Path | None = None, prog: str | None = None
) -> int:
    """Parse, run, print the tables, write JSON / Markdown / plot. Exit status 1 when a kernel
    gave a wrong result (targets missed are measurements, not failures)."""
    from rich.console import Console

    from . import report

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(default_json, prog)
    args = parser.parse_args(argv)
    _check_before_running(parser, args)
    options = options_from_args(args)
    # `--json -`: stdout is the JSON alone (as with the other commands' --json), the tables go to stderr.
    json_stdout = args.json == "-"
    out = sys.stderr if json_stdout else sys.stdout
    # Wide enough for the main table when the output is a file or a pipe.
    console = Console(file=out, width=None if out.isatty() else 220)
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([*(prog or Path(sys.argv[0]).name).split(), *argv])
    try:
        with _ext.isa(args.isa) if args.isa else contextlib.nullcontext():
            result = run(options, command=command, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(old_threads)
    report.print_report(result, console)
    if json_stdout:
        sys.stdout.write(report.to_json(result))
    elif args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(result, path)
        console.print(f"wrote {path}")
    if args.markdown:
        write_result(args.markdown, report.markdown(result))
        console.print(f"wrote {args.markdown}")
    if args.plot:
        console.print(f"wrote {report.plot(result, args.plot)}")
    return 1 if any(r["status"] in ("wrong", "error") for r in result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m sparseflow.bench.kernels"))
