"""When a sparse module switches from its sparse kernel to its batched path: more rows of x than
its measured crossover `dense_above` (None: never). One rule for SparseLinear and ActSparseLinear."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..ops import table
from ..ops.bound import stamp
from ..ops.table import rows_of


def above_crossover(x: torch.Tensor, dense_above: int | None) -> bool:
    return dense_above is not None and rows_of(x) > dense_above


def run_at_crossover(x: torch.Tensor, dense_above: int | None, run):
    """run(x, above) for the side of the crossover x falls on. Under torch.export with a dynamic
    number of rows, both sides go into the program (torch.cond on the row count), so that one
    exported model serves decode and prefill alike: choosing a side in Python would pin the rows
    to it. (With dense_above 0 the batched side itself depends on the rows: left to Python.)"""
    if dense_above is not None and dense_above >= 1 and torch.compiler.is_exporting():
        rows = rows_of(x)
        if isinstance(rows, torch.SymInt):
            return torch.cond(rows > dense_above, lambda t: run(t, True), lambda t: run(t, False), (x,))
    return run(x, above_crossover(x, dense_above))


def batched_backend_above(x: torch.Tensor, dense_above: int) -> str:
    """The batched backend for x's rows above the crossover: more than dense_above >= 1 rows are at
    least 2, which names it without reading the row count (symbolic under torch.export)."""
    return table.batched_backend(x.device.type, rows_of(x) if dense_above < 1 else 2)


def linear_on_dense_copy(x: torch.Tensor, dense_copy: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on a layer's dense copy, refusing another dtype as the sparse ops do."""
    if isinstance(x, torch.Tensor) and x.dtype != dense_copy.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {dense_copy.dtype}; convert one of them")
    return F.linear(x, dense_copy, bias)


def weight_stamp(buffers) -> tuple | None:
    """What a layer's dense copy was made from: its weight buffers' addresses and versions (None
    while compiling or tracing, or for tensors without storage: no data to compare)."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return None
    try:
        return stamp(buffers)
    except RuntimeError:
        return None


def refresh_dense_copy(module, weight_buffers: Callable[[], Iterable[torch.Tensor]]) -> None:
    """Makes the module's dense copy again (module._keep_dense(True)) where its weight buffers changed
    since it was made (an in-place edit bumps a version, .to() or an assignment moves an address):
    else prefill rows would run an old weight while decode rows ran the new one. Not while compiling:
    the graph would guard on the stamp (module._dense_copy_of) and recompile per module; the buffers
    come through a callable, so that nothing of them is traced either."""
    if torch.compiler.is_compiling():
        return
    now = weight_stamp(weight_buffers())
    if now is not None and now != module._dense_copy_of:
        module._keep_dense(True)
