"""N:M: every group of m consecutive weights in a row keeps n values (any n < m, m in {4, 8, 16}).
Values [rows, groups * n] and each value's position in its group: 2 bits for m = 4 (so 2:4 costs
4 bits per group), 4 bits otherwise. A group with fewer than n non-zeros stores zeros; a row whose
length is not a multiple of m ends in a partial group whose missing columns read as zero."""

from __future__ import annotations

import torch

from .. import _ext
from ._bits import pack_fields, unpack_fields
from .base import SparseFormat, check_weight


def check_nm(n: int, m: int) -> tuple[int, int]:
    if m not in (4, 8, 16) or not 0 < n < m:
        raise ValueError(f"n:m needs 0 < n < m and m in {{4, 8, 16}}, got {n}:{m}")
    return int(n), int(m)


class NM(SparseFormat):
    format_name = "nm"
    tensor_names = ("values", "index")

    def __init__(self, shape, values, index, n, m, validate=True):
        self.shape = torch.Size(shape)
        self.n, self.m = check_nm(n, m)
        self.values, self.index = values, index
        if validate:
            self._validate()
        self._freeze()

    def params(self):
        return {"n": self.n, "m": self.m}

    @property
    def index_bits(self) -> int:
        return 2 if self.m == 4 else 4

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.m)

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int = 2, m: int = 4, prune: bool = False) -> NM:
        """Raises ValueError naming the first row and group with more than n non-zeros, unless
        `prune=True`, which keeps the n largest magnitudes of each group instead."""
        w = check_weight(w)
        n, m = check_nm(n, m)
        rows, cols = w.shape
        grouped = torch.nn.functional.pad(w, (0, (-cols) % m)).view(rows, -1, m)
        nonzero = grouped != 0
        if prune:
            score = grouped.abs().float().nan_to_num(nan=float("inf"))
        else:
            over = nonzero.sum(-1) > n
            if bool(over.any()):
                r, g = (int(i) for i in over.nonzero()[0])
                raise ValueError(
                    f"weight is not {n}:{m} sparse: row {r}, group {g} (columns {g * m}..{min(cols, g * m + m) - 1}) "
                    f"has {int(nonzero[r, g].sum())} non-zeros; use prune=True to keep the {n} largest"
                )
            # Non-zeros first, then the earliest zero positions fill up the group.
            score = nonzero.float() * 2 - torch.arange(m, device=w.device) / m
        position = score.topk(n, dim=-1).indices.sort(-1).values
        values = grouped.gather(-1, position).reshape(rows, -1)
        index = pack_fields(position.reshape(rows, -1).to(torch.uint8), 2 if m == 4 else 4)
        return cls(w.shape, values.contiguous(), index, n, m, validate=False)

    @classmethod
    def from_tensors(cls, shape, tensors, validate=True, n=2, m=4) -> NM:
        return cls(shape, tensors["values"], tensors["index"], n, m, validate=validate)

    def _validate(self) -> None:
        rows, cols = self.shape
        per_row = self.groups * self.n
        stride = -(-per_row * self.index_bits // 8)
        v, idx = self.values, self.index
        if rows < 1 or cols < 1:
            raise ValueError(f"n:m: shape {tuple(self.shape)} is empty")
        if v.dtype not in _ext.DTYPE_CODES or tuple(v.shape) != (rows, per_row):
            raise ValueError(f"n:m: values must be float {(rows, per_row)}, got {v.dtype} {tuple(v.shape)}")
        if idx.dtype != torch.uint8 or tuple(idx.shape) != (rows, stride):
            raise ValueError(f"n:m: index must be uint8 {(rows, stride)}, got {idx.dtype} {tuple(idx.shape)}")
        i = idx.cpu().contiguous()
        _ext._C.validate_nm(i.data_ptr(), rows, cols, self.n, self.m, stride)

    def positions(self) -> torch.Tensor:
        """uint8 [rows, groups * n]: each value's position within its group."""
        return unpack_fields(self.index, self.groups * self.n, self.index_bits)

    @property
    def nnz(self) -> int:
        return int(self.values.count_nonzero())

    @property
    def density(self) -> float:
        """Stored fraction: n / m (stored zeros included)."""
        return self.n / self.m

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows, self.groups, self.m, dtype=self.dtype, device=self.device)
        pos = self.positions().view(rows, self.groups, self.n).to(torch.int64)
        out.scatter_(-1, pos, self.values.view(rows, self.groups, self.n))
        return out.view(rows, -1)[:, :cols]

    def to_semi_structured(self):
        """torch's semi-structured sparse tensor (cuSPARSELt / CUTLASS layout) of this 2:4 weight.
        Needs a CUDA device, as torch's own conversion does."""
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"torch's semi-structured layout is 2:4 only, this weight is {self.n}:{self.m}")
        if self.device.type != "cuda":
            raise RuntimeError("torch semi-structured sparse tensors need a CUDA device; call .to('cuda') first")
        return torch.sparse.to_sparse_semi_structured(self.to_dense())
