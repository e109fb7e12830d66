"""When a sparse module switches from its sparse kernel to its batched path: more rows of x than
its measured crossover `dense_above` (None: never). One rule for SparseLinear and ActSparseLinear."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..ops import table
from ..ops.bound import stamp
from ..ops.table import rows_of


def run_at_crossover(x: torch.Tensor, dense_above: int | None, run):
    """run(x, batched) for the side of the crossover x falls on: batched None up to `dense_above`
    rows (None: every row count), else the name of the batched backend for x's rows. While
    exporting, both sides go into the program (torch.cond on the row count), so that one exported
    model serves decode and prefill alike: choosing a side in Python would pin the rows to it (under
    strict export the row count does not even show as symbolic). With dense_above 0 the batched
    side itself depends on the rows (one row has no batched path): a cond between those two."""
    if dense_above is None:
        return run(x, None)
    device, rows = x.device.type, rows_of(x)
    # (a static row count needs no cond, except under strict export, where a dynamic one shows as an int)
    if torch.compiler.is_exporting() and (isinstance(rows, torch.SymInt) or torch.compiler.is_dynamo_compiling()):
        below = (lambda t: run(t, None)) if dense_above >= 1 else (lambda t: run(t, table.batched_backend(device, 1)))
        return torch.cond(rows > max(dense_above, 1), lambda t: run(t, table.batched_backend(device, 2)), below, (x,))
    return run(x, table.batched_backend(device, rows) if rows > dense_above else None)


def linear_on_dense_copy(x: torch.Tensor, dense_copy: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on a layer's dense copy, refusing another dtype as the sparse ops do."""
    if isinstance(x, torch.Tensor) and x.dtype != dense_copy.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {dense_copy.dtype}; convert one of them")
    return F.linear(x, dense_copy, bias)


def read_buffers(module: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{key: module's buffer `names[key]`}, read once: in eager from one copy of the buffer dict, so
    that another thread's load_state_dict between two reads cannot mix two weights (under a
    compiler, by attribute, as Dynamo traces modules)."""
    if torch.compiler.is_compiling():
        return {key: getattr(module, name) for key, name in names.items()}
    buffers = dict(module._buffers)
    return {key: buffers[name] for key, name in names.items()}


def weight_stamp(buffers) -> tuple | None:
    """What a layer's dense copy was made from: its weight buffers' addresses and versions (None
    while compiling or tracing, on the meta device, or for tensors without storage: no data to
    compare)."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return None
    buffers = list(buffers)
    if any(t is not None and t.is_meta for t in buffers):  # (a meta module's copy moved with it: shapes only)
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
