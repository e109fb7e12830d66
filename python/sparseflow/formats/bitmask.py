"""Bitmask: unstructured sparsity. The non-zeros in row-major order, one mask bit per element and
an int64 offset per row (so rows can be processed in parallel). Metadata: 1 bit per element +
8 bytes per row. A -0.0 counts as zero (it is not stored and comes back as +0.0); NaN and inf are
stored and round-trip."""

from __future__ import annotations

import torch

from .. import _ext
from ._bits import pack_bits, row_chunks, scatter_into, select, unpack_bits
from .base import SparseFormat, check_shape, check_weight, take_tensors


class Bitmask(SparseFormat):
    format_name = "bitmask"
    tensor_names = ("values", "mask", "row_offsets")

    def __init__(self, shape, values: torch.Tensor, mask: torch.Tensor, row_offsets: torch.Tensor,
                 validate=True):
        self.shape = torch.Size(shape)
        self.values, self.mask, self.row_offsets = values, mask, row_offsets
        if validate:
            self._validate()
        self._freeze()

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> Bitmask:
        w = check_weight(w)
        rows, cols = w.shape
        values, masks, counts = [], [], []
        for s in row_chunks(rows, cols, device=w.device):
            chunk = w[s]
            nonzero = chunk != 0
            values.append(select(chunk, nonzero))
            masks.append(pack_bits(nonzero))
            counts.append(nonzero.sum(1))
        row_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(torch.cat(counts), 0, out=row_offsets[1:])
        return cls(w.shape, torch.cat(values), torch.cat(masks), row_offsets, validate=False)

    @classmethod
    def from_tensors(cls, shape, tensors, validate=True) -> Bitmask:
        return cls(shape, *take_tensors(cls, tensors, validate), validate=validate)

    def _validate(self) -> None:
        check_shape(self)
        rows, cols = self.shape
        v, mask, offs = self.values, self.mask, self.row_offsets
        if v.dim() != 1 or v.dtype not in _ext.DTYPE_CODES:
            raise ValueError(f"bitmask: values must be a 1-D float tensor, got {v.dtype} {tuple(v.shape)}")
        if mask.dtype != torch.uint8 or tuple(mask.shape) != (rows, (cols + 7) // 8):
            raise ValueError(
                f"bitmask: mask must be uint8 {(rows, (cols + 7) // 8)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if offs.dtype != torch.int64 or tuple(offs.shape) != (rows + 1,):
            raise ValueError(
                f"bitmask: row_offsets must be int64 ({rows + 1},), got {offs.dtype} {tuple(offs.shape)}"
            )
        m, o = mask.cpu().contiguous(), offs.cpu().contiguous()
        _ext._C.validate_bitmask(m.data_ptr(), o.data_ptr(), rows, cols, m.shape[1], v.numel())

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=self.dtype, device=self.device)
        chunks = list(row_chunks(rows, cols, device=self.device))
        bounds = self.row_offsets[[s.start for s in chunks] + [rows]].tolist()
        for i, s in enumerate(chunks):
            chunk = self.values[bounds[i]:bounds[i + 1]]
            scatter_into(out[s], unpack_bits(self.mask[s], cols), chunk)
        return out
