"""BSR: block sparsity with any (bm, bk) block whose sides are powers of two from 1 to 128. Kept
blocks are stored whole, [nblocks, bm, bk], with one int32 block-column index each and int64
block-row pointers. Shapes that are not a multiple of the block are zero-padded inside the edge
blocks (the logical shape is kept). A -0.0 counts as zero: inside a kept block it is stored, and
comes back, as +0.0; NaN and inf are stored and round-trip."""

from __future__ import annotations

import operator

import torch

from .. import _ext
from ._bits import row_chunks
from .base import SparseFormat, check_shape, check_weight, take_tensors


def check_block(block) -> tuple[int, int]:
    try:
        bm, bk = (operator.index(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair of ints (bm, bk), got {block!r}") from None
    for side in (bm, bk):
        if side < 1 or side > 128 or side & (side - 1):
            raise ValueError(f"block sides must be powers of two from 1 to 128, got {(bm, bk)}")
    return bm, bk


class BSR(SparseFormat):
    format_name = "bsr"
    tensor_names = ("values", "col_indices", "row_ptr")

    def __init__(self, shape, values, col_indices, row_ptr, block, validate=True):
        self.shape = torch.Size(shape)
        self.block = check_block(block)
        self.values, self.col_indices, self.row_ptr = values, col_indices, row_ptr
        if validate:
            self._validate()
        self._freeze()

    def params(self):
        return {"block": list(self.block)}

    @staticmethod
    def blocked(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        """[rows, cols] -> zero-padded [block_rows, block_cols, bm, bk]."""
        bm, bk = block
        rows, cols = w.shape
        w = torch.nn.functional.pad(w, (0, (-cols) % bk, 0, (-rows) % bm))
        return w.reshape(w.shape[0] // bm, bm, w.shape[1] // bk, bk).transpose(1, 2)

    @classmethod
    def from_dense(cls, w: torch.Tensor, block=(32, 32)) -> BSR:
        w = check_weight(w)
        bm, bk = block = check_block(block)
        rows, cols = w.shape
        values, columns, counts = [], [], []
        for s in row_chunks(rows, cols, multiple=bm, device=w.device):
            blocks = cls.blocked(w[s], block)  # [block_rows, block_cols, bm, bk], a view where possible
            kept = cls.blocked(w[s] != 0, block).transpose(1, 2).any(-1).any(1)  # [block_rows, block_cols]
            kept_values = blocks[kept]
            # A -0.0 counts as zero everywhere: inside a kept block it is stored as +0.0.
            values.append(kept_values.masked_fill_(kept_values == 0, 0))
            columns.append(kept.nonzero()[:, 1].to(torch.int32))
            counts.append(kept.sum(1))
        row_ptr = torch.zeros(-(-rows // bm) + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(torch.cat(counts), 0, out=row_ptr[1:])
        return cls(w.shape, torch.cat(values), torch.cat(columns), row_ptr, block, validate=False)

    @classmethod
    def from_tensors(cls, shape, tensors, validate=True, block=(32, 32)) -> BSR:
        return cls(shape, *take_tensors(cls, tensors, validate), block, validate=validate)

    def _validate(self) -> None:
        check_shape(self)
        rows, cols = self.shape
        bm, bk = self.block
        v, col, ptr = self.values, self.col_indices, self.row_ptr
        block_rows = -(-rows // bm)
        if v.dim() != 3 or tuple(v.shape[1:]) != (bm, bk) or v.dtype not in _ext.DTYPE_CODES:
            raise ValueError(
                f"bsr: values must be float [nblocks, {bm}, {bk}], got {v.dtype} {tuple(v.shape)}"
            )
        if col.dtype != torch.int32 or tuple(col.shape) != (v.shape[0],):
            raise ValueError(
                f"bsr: col_indices must be int32 ({v.shape[0]},), got {col.dtype} {tuple(col.shape)}"
            )
        if ptr.dtype != torch.int64 or tuple(ptr.shape) != (block_rows + 1,):
            raise ValueError(
                f"bsr: row_ptr must be int64 ({block_rows + 1},), got {ptr.dtype} {tuple(ptr.shape)}"
            )
        c, p = col.cpu().contiguous(), ptr.cpu().contiguous()
        _ext._C.validate_bsr(c.data_ptr(), p.data_ptr(), rows, cols, bm, bk, v.shape[0])
        # Edge blocks reach past the matrix: the kernels multiply their padding by x's zero padding,
        # so it must hold zeros (an inf there would turn outputs into NaN; to_dense drops it).
        if rows % bm:
            last = v[int(p[-2]):int(p[-1])]
            if bool((last[:, rows % bm:, :] != 0).any()):
                raise ValueError(f"bsr: a block of the last block row holds non-zero values past row {rows - 1}")
        if cols % bk:
            edge = v[(c == -(-cols // bk) - 1).to(v.device)]
            if bool((edge[:, :, cols % bk:] != 0).any()):
                raise ValueError(f"bsr: a block of the last block column holds non-zero values past column {cols - 1}")

    @property
    def nnz(self) -> int:
        """Non-zero elements inside the stored blocks."""
        return int(self.values.count_nonzero())

    @property
    def nblocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the weight covered by stored blocks."""
        bm, bk = self.block
        rows, cols = self.shape
        return min(1.0, self.nblocks * bm * bk / (rows * cols))

    def to_dense(self) -> torch.Tensor:
        bm, bk = self.block
        rows, cols = self.shape
        block_rows, block_cols = -(-rows // bm), -(-cols // bk)
        blocks = torch.zeros(block_rows, block_cols, bm, bk, dtype=self.dtype, device=self.device)
        brow = torch.repeat_interleave(torch.arange(block_rows, device=self.device), self.row_ptr.diff())
        blocks[brow, self.col_indices.to(torch.int64)] = self.values
        dense = blocks.transpose(1, 2).reshape(block_rows * bm, block_cols * bk)
        # contiguous even where reshape could return a view (blocks one column wide: (4, 1) blocks)
        return dense[:rows, :cols].contiguous()
