"""sparseflow: a compiled-kernel sparse runtime for PyTorch.

Compress pruned weights (Bitmask, CSR, BSR, N:M), run them with kernels that were measured to
beat dense, and save and load sparse models safely. See README.md for the tour."""

from . import ops
from ._ext import available_isas, isa
from ._version import __version__
from .formats import BSR, CSR, NM, Bitmask, Pattern, SparseFormat, detect_pattern
from .info import info
from .model_io import export_compressed_tensors, export_dense, from_pretrained, load, save, save_pretrained
from .nn import ActSparseLinear, SparseLinear
from .prune import prune, shrink
from .sparsify import sparsify

__all__ = [
    "BSR", "CSR", "NM", "ActSparseLinear", "Bitmask", "Pattern", "SparseFormat", "SparseLinear", "__version__",
    "available_isas", "detect_pattern", "export_compressed_tensors", "export_dense", "from_pretrained", "info", "isa",
    "load", "ops", "prune", "save", "save_pretrained", "shrink", "sparsify",
]
