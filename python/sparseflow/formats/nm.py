"""N:M: every group of m consecutive weights in a row keeps n values (any n < m, m in {4, 8, 16}).
Values [rows, groups * n] and each value's position in its group: 2 bits for m = 4 (so 2:4 costs
4 bits per group), 4 bits otherwise. A group with fewer than n non-zeros stores zeros; a row whose
length is not a multiple of m ends in a partial group whose missing columns read as zero. A -0.0
counts as zero and comes back as +0.0; NaN and inf are stored and round-trip."""

from __future__ import annotations

import operator

import torch

from .. import _ext
from ._bits import as_int, group_codes, pack_fields, popcount, row_chunks, unpack_fields
from .base import SparseFormat, check_shape, check_weight, take_tensors


def check_nm(n: int, m: int) -> tuple[int, int]:
    try:
        n, m = operator.index(n), operator.index(m)
    except TypeError:
        raise ValueError(f"n and m must be integers, got {n!r}:{m!r}") from None
    if m not in (4, 8, 16) or not 0 < n < m:
        raise ValueError(f"n:m needs 0 < n < m and m in {{4, 8, 16}}, got {n}:{m}")
    return n, m


_TABLES: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _position_table(n: int, m: int, device: torch.device) -> torch.Tensor:
    """For every group code (bit j set = element j is non-zero), the n positions to store, int64
    [2**m, n]: the non-zeros, then the earliest zeros to fill the group, in increasing order. A code
    with more than n non-zeros has -1 in every position."""
    key = (n, m, device)
    if key not in _TABLES:
        codes = torch.arange(1 << m)
        nonzero = (codes[:, None] >> torch.arange(m)) & 1
        score = nonzero * 2 * m - torch.arange(m)  # non-zeros first, earlier first
        positions = score.topk(n, dim=1).indices.sort(1).values
        positions[popcount(codes) > n] = -1
        _TABLES[key] = positions.to(device)
    return _TABLES[key]


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
        `prune=True`, which keeps the n largest magnitudes of each group instead (NaN counts as
        largest). A -0.0 counts as zero and is stored as +0.0."""
        w = check_weight(w)
        n, m = check_nm(n, m)
        rows, cols = w.shape
        groups = -(-cols // m)
        index_bits = 2 if m == 4 else 4
        table = _position_table(n, m, w.device)
        values = torch.empty(rows, groups * n, dtype=w.dtype, device=w.device)
        index = torch.empty(rows, -(-groups * n * index_bits // 8), dtype=torch.uint8, device=w.device)
        for s in row_chunks(rows, cols, device=w.device):
            chunk = w[s]
            if cols % m:
                chunk = torch.nn.functional.pad(chunk, (0, (-cols) % m))
            grouped = chunk.reshape(chunk.shape[0], groups, m)
            if prune:
                score = grouped.abs().float().nan_to_num(nan=float("inf"))
                position = score.topk(n, dim=-1).indices.sort(-1).values
            else:
                code = group_codes(chunk != 0, m)  # [rows, groups]
                position = table.index_select(0, code.view(-1)).view(*code.shape, n)
                over = position[..., 0] < 0
                if bool(over.any()):
                    r, g = (int(i) for i in over.nonzero()[0])
                    raise ValueError(
                        f"weight is not {n}:{m} sparse: row {s.start + r}, group {g} (columns {g * m}.."
                        f"{min(cols, g * m + m) - 1}) has {int(popcount(code[r, g]))} non-zeros; "
                        f"use prune=True to keep the {n} largest"
                    )
            kept = values[s].view(position.shape)
            torch.gather(as_int(grouped), -1, position, out=as_int(kept))
            kept.masked_fill_(kept == 0, 0)  # -0.0 is stored as +0.0
            index[s] = pack_fields(position.view(position.shape[0], -1), index_bits)
        return cls(w.shape, values, index, n, m, validate=False)

    @classmethod
    def from_tensors(cls, shape, tensors, validate=True, n=2, m=4) -> NM:
        return cls(shape, *take_tensors(cls, tensors, validate), n, m, validate=validate)

    def _validate(self) -> None:
        check_shape(self)
        rows, cols = self.shape
        per_row = self.groups * self.n
        stride = -(-per_row * self.index_bits // 8)
        v, idx = self.values, self.index
        if v.dtype not in _ext.DTYPE_CODES or tuple(v.shape) != (rows, per_row):
            raise ValueError(f"n:m: values must be float {(rows, per_row)}, got {v.dtype} {tuple(v.shape)}")
        if idx.dtype != torch.uint8 or tuple(idx.shape) != (rows, stride):
            raise ValueError(f"n:m: index must be uint8 {(rows, stride)}, got {idx.dtype} {tuple(idx.shape)}")
        i = idx.cpu().contiguous()
        _ext._C.validate_nm(i.data_ptr(), rows, cols, self.n, self.m, stride)
        # m = 8 stores 4-bit positions, which can hold 8..15; the C++ check assumes pos < m always
        # holds, so a crafted index would make kernels read x past the group (and past K at the end).
        if self.m == 8:
            over = unpack_fields(i, per_row, self.index_bits) >= self.m
            if bool(over.any()):
                r, j = (int(k) for k in over.nonzero()[0])
                raise ValueError(f"n:m: position in row {r} group {j // self.n} is >= m = {self.m}")
        if cols % self.m and rows:
            # the last group runs past K: the kernels multiply a value placed there by x's zero padding,
            # so it must be zero (an inf there would turn the row into NaN; to_dense drops it)
            last = unpack_fields(i, per_row, self.index_bits)[:, -self.n:].to(torch.int64)
            past = (last >= cols % self.m) & (v[:, -self.n:].cpu() != 0)
            if bool(past.any()):
                r = int(past.nonzero()[0, 0])
                raise ValueError(f"n:m: row {r} holds a non-zero value past column {cols - 1} (in the padding of "
                                 "its last group)")

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
        groups, n, m = self.groups, self.n, self.m
        out = torch.zeros(rows, groups * m, dtype=self.dtype, device=self.device)
        for s in row_chunks(rows, groups * m, device=self.device):
            pos = unpack_fields(self.index[s], groups * n, self.index_bits, torch.int64).view(-1, groups, n)
            values = as_int(self.values[s]).reshape(-1, groups, n)
            as_int(out[s]).view(-1, groups, m).scatter_(-1, pos, values)
        return out if cols == groups * m else out[:, :cols].contiguous()

    def to_semi_structured(self):
        """torch's semi-structured sparse tensor (cuSPARSELt / CUTLASS layout) of this 2:4 weight.
        Needs a CUDA device, as torch's own conversion does."""
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"torch's semi-structured layout is 2:4 only, this weight is {self.n}:{self.m}")
        if self.device.type != "cuda":
            raise RuntimeError(
                "torch semi-structured sparse tensors need a CUDA device; call .to('cuda') first"
            )
        return torch.sparse.to_sparse_semi_structured(self.to_dense())
