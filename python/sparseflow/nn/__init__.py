"""Sparse modules that replace nn.Linear."""

from .act_sparse_linear import ActSparseLinear, input_modes, threshold_for
from .sparse_linear import SparseLinear, auto_format

__all__ = ["ActSparseLinear", "SparseLinear", "auto_format", "input_modes", "threshold_for"]
