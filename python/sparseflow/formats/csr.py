"""CSR: for very high sparsity. Values, column indices (int16 when K <= 65536, read as unsigned,
else int32) and int64 row pointers. A -0.0 counts as zero (it is not stored and comes back as +0.0);
NaN and inf are stored and round-trip."""

from __future__ import annotations

import torch

from .. import _ext
from ._bits import flat_positions, row_chunks, select
from .base import SparseFormat, check_shape, check_weight, take_tensors


class CSR(SparseFormat):
    format_name = "csr"
    tensor_names = ("values", "col_indices", "row_ptr")

    def __init__(self, shape, values, col_indices, row_ptr, validate=True):
        self.shape = torch.Size(shape)
        self.values, self.col_indices, self.row_ptr = values, col_indices, row_ptr
        if validate:
            self._validate()
        self._freeze()

    @staticmethod
    def index_dtype(cols: int) -> torch.dtype:
        return torch.int16 if cols <= 65536 else torch.int32

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> CSR:
        w = check_weight(w)
        rows, cols = w.shape
        index_dtype = cls.index_dtype(cols)
        values, columns, counts = [], [], []
        for s in row_chunks(rows, cols, device=w.device):
            chunk = w[s]
            nonzero = chunk != 0
            flat = flat_positions(nonzero)  # row-major positions in the chunk
            values.append(select(chunk, nonzero, flat))
            col = flat % cols
            # int16 holds 0..65535 as two's complement; kernels and to_dense read it as unsigned.
            if index_dtype == torch.int16:
                col = torch.where(col >= 32768, col - 65536, col)
            columns.append(col.to(index_dtype))
            counts.append(nonzero.sum(1))
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(torch.cat(counts), 0, out=row_ptr[1:])
        return cls(w.shape, torch.cat(values), torch.cat(columns), row_ptr, validate=False)

    @classmethod
    def from_tensors(cls, shape, tensors, validate=True) -> CSR:
        return cls(shape, *take_tensors(cls, tensors, validate), validate=validate)

    def _validate(self) -> None:
        check_shape(self)
        rows, cols = self.shape
        v, col, ptr = self.values, self.col_indices, self.row_ptr
        if v.dim() != 1 or v.dtype not in _ext.DTYPE_CODES:
            raise ValueError(f"csr: values must be a 1-D float tensor, got {v.dtype} {tuple(v.shape)}")
        if col.dtype not in (torch.int16, torch.int32) or tuple(col.shape) != tuple(v.shape):
            raise ValueError(
                f"csr: col_indices must be int16/int32 of shape {tuple(v.shape)}, "
                f"got {col.dtype} {tuple(col.shape)}"
            )
        if ptr.dtype != torch.int64 or tuple(ptr.shape) != (rows + 1,):
            raise ValueError(f"csr: row_ptr must be int64 ({rows + 1},), got {ptr.dtype} {tuple(ptr.shape)}")
        c, p = col.cpu().contiguous(), ptr.cpu().contiguous()
        bits = 16 if c.dtype == torch.int16 else 32
        _ext._C.validate_csr(c.data_ptr(), bits, p.data_ptr(), rows, cols, v.numel())

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def column_indices(self) -> torch.Tensor:
        """Column indices as int64 (int16 storage read as unsigned)."""
        col = self.col_indices.to(torch.int64)
        return col & 0xFFFF if self.col_indices.dtype == torch.int16 else col

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=self.dtype, device=self.device)
        row = torch.repeat_interleave(torch.arange(rows, device=self.device), self.row_ptr.diff())
        out[row, self.column_indices()] = self.values
        return out
