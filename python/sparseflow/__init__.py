"""sparseflow: a compiled-kernel sparse runtime for PyTorch.

Compress pruned weights (Bitmask, CSR, BSR, N:M), run them with kernels that were measured to
beat dense, and save and load sparse models safely. See README.md for the tour."""

from . import ops
from ._ext import available_isas, isa
from ._version import __version__
from .formats import BSR, CSR, NM, Bitmask, Pattern, SparseFormat, detect_pattern
from .info import info

__all__ = [
    "BSR", "CSR", "NM", "Bitmask", "Pattern", "SparseFormat", "__version__", "available_isas", "detect_pattern",
    "info", "isa", "ops",
]
