"""Sparse ops: custom ops over the backend table (see table.py) with plain-torch references."""

from . import table
from .linear import act_sparse_linear, linear, linear_from_buffers
from .reference import act_sparse_linear_reference, linear_reference

__all__ = [
    "act_sparse_linear", "act_sparse_linear_reference", "linear", "linear_from_buffers", "linear_reference", "table",
]
