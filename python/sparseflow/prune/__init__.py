"""One-shot pruning: `prune(model, method, sparsity, pattern, calibration, allocation)` zeroes weights
of a model's Linear layers in place (magnitude, Wanda, SparseGPT; unstructured, n:m, block(bm,bk),
neurons, heads) and `shrink(model)` physically removes pruned neurons and heads. See docs/pruning.md.

The top level binds `sparseflow.prune` to the function, so reach this package's other names with
`from sparseflow.prune import ...` (the import system finds the package in sys.modules), not as
attributes of `sparseflow.prune`."""

from .allocation import ALLOCATIONS
from .capture import Calibration
from .criteria import magnitude_prune_, wanda_prune_
from .oneshot import METHODS, prune, select_linears
from .patterns import PatternSpec, parse_pattern
from .report import LayerPruneReport, PruneReport, ShrinkEntry, ShrinkReport
from .shrink import load_shrunk, shrink
from .sparsegpt import sparsegpt_prune_
from .structured import STRUCTURED_METHODS, find_attention, find_mlps

__all__ = [
    "ALLOCATIONS", "METHODS", "STRUCTURED_METHODS", "Calibration", "LayerPruneReport", "PatternSpec", "PruneReport",
    "ShrinkEntry", "ShrinkReport", "find_attention", "find_mlps", "load_shrunk", "magnitude_prune_", "parse_pattern",
    "prune", "select_linears", "shrink", "sparsegpt_prune_", "wanda_prune_",
]
