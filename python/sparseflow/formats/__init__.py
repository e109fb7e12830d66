"""Compressed weight formats: immutable, lossless conversions from and to dense."""

from .base import SparseFormat
from .bitmask import Bitmask
from .bsr import BSR
from .csr import CSR
from .detect import Pattern, detect_pattern
from .nm import NM

FORMATS = {cls.format_name: cls for cls in (Bitmask, CSR, BSR, NM)}

__all__ = ["BSR", "CSR", "FORMATS", "NM", "Bitmask", "Pattern", "SparseFormat", "detect_pattern"]
