"""Vectorised helpers shared by the formats: bit packing (little bit order: bit j of byte b is element
8b+j, as numpy.packbits(..., bitorder="little") writes it), packed fields, group codes, exact
(bitwise) selection and scattering of values, and row chunking.

Speed notes, measured on a 14336x4096 weight (benchmarks/bench_formats.py):
- conversions walk the weight in chunks of rows: a chunk's temporaries stay in cache and the
  allocator reuses them, where whole-matrix temporaries are fresh pages and page faults dominate;
- on the CPU, positions of non-zeros come from numpy's nonzero, several times faster than torch's;
- values move as same-width integers (as_int), which is also what keeps NaN payloads exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 20
# On a GPU each torch op of a chunk is a launch of its own: 1M-element chunks made a 14336x4096
# weight's to_dense take 8.8 ms on an H100 (launch-bound); 16M-element chunks keep the temporaries
# (int64 positions) near 128 MiB.
GPU_CHUNK_ELEMENTS = 1 << 24

_POPCOUNT: dict[torch.device, torch.Tensor] = {}


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def as_int(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width. torch's bf16 gather and scatter_ on CPU
    rewrite every NaN as 0xFFFF; moving the bits as integers keeps each value exactly."""
    return t.view(_SAME_WIDTH_INT[t.dtype])


def _numpy_ok(*tensors: torch.Tensor) -> bool:
    """numpy shortcuts only for plain CPU tensors outside tracing (compile, export, fake tensors)."""
    return (all(t.device.type == "cpu" and type(t) is torch.Tensor for t in tensors)
            and not torch.compiler.is_compiling())


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """int64 positions of the True elements of mask in row-major order (mask.flatten().nonzero()).
    On the CPU they come from numpy, whose nonzero is several times faster than torch's there."""
    if not _numpy_ok(mask):
        return mask.reshape(-1).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def select(values: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """values[mask] (1-D, row-major order), bit for bit; `positions` = flat_positions(mask) if known."""
    if not _numpy_ok(values, mask):
        return values[mask]
    positions = flat_positions(mask) if positions is None else positions
    flat = as_int(values.detach()).contiguous().numpy().reshape(-1)
    return torch.from_numpy(flat.take(positions.numpy())).view(values.dtype)


def scatter_into(out: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> None:
    """out[mask] = values (values in row-major order of mask), bit for bit; `out` contiguous."""
    if not _numpy_ok(out, mask, values):
        out[mask] = values
        return
    positions = np.flatnonzero(mask.numpy())
    if positions.size != values.numel():
        raise ValueError(f"{positions.size} mask bits set but {values.numel()} values")
    as_int(out).numpy().reshape(-1)[positions] = as_int(values.detach()).contiguous().numpy()


def row_chunks(rows: int, cols: int, multiple: int = 1, target: int | None = None,
               device: torch.device | None = None) -> Iterator[slice]:
    """Slices of about `target` (default CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS for tensors on `device`
    a GPU) elements covering rows 0..rows; each starts at a multiple of `multiple`, and has at
    least `multiple` rows."""
    if target is None:
        target = CHUNK_ELEMENTS if device is None or device.type == "cpu" else GPU_CHUNK_ELEMENTS
    step = max(multiple, target // max(cols, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [R, C] -> uint8 [R, ceil(C / 8)]."""
    rows, cols = mask.shape
    if cols % 8:
        mask = torch.nn.functional.pad(mask, (0, (-cols) % 8))
    # Eight 0/1 bytes as one int64 (little-endian): fold byte j+1, j+2..3, j+4..7 into byte j's bits.
    x = mask.contiguous().view(torch.uint8).view(torch.int64)
    x = x | (x >> 7)
    x = x | (x >> 14)
    x = x | (x >> 28)
    return (x & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [R, B] -> bool [R, cols]."""
    # The inverse spread: bit k of a byte moves to bit 0 of byte k of an int64 (little-endian).
    x = packed.to(torch.int64)
    x = (x | (x << 28)) & 0x0000000F0000000F
    x = (x | (x << 14)) & 0x0003000300030003
    x = (x | (x << 7)) & 0x0101010101010101
    return x.view(torch.uint8).view(torch.bool)[:, :cols]


def popcount(codes: torch.Tensor) -> torch.Tensor:
    """Set bits of each element of an integer tensor holding values below 2**16 -> int64."""
    device = codes.device
    if device not in _POPCOUNT:
        table = torch.zeros(1 << 16, dtype=torch.int64)
        for bit in range(16):
            table += (torch.arange(1 << 16) >> bit) & 1
        _POPCOUNT[device] = table.to(device)
    return _POPCOUNT[device].index_select(0, codes.reshape(-1)).view(codes.shape)


def group_codes(mask: torch.Tensor, m: int) -> torch.Tensor:
    """bool [R, G * m] (m in 4, 8, 16) -> int32 [R, G]: bit j of a group's code is its element j."""
    rows = mask.shape[0]
    x = mask.contiguous().view(torch.uint8)
    if m == 4:  # a group is the four 0/1 bytes of one int32: fold them into byte 0 as for pack_bits
        x = x.view(torch.int32)
        x = x | (x >> 7)
        x = x | (x >> 14)
        return x & 0xF
    packed = pack_bits(x.view(torch.bool))
    if m == 8:
        return packed.to(torch.int32)
    return packed.view(rows, -1, 2).view(torch.int16).squeeze(-1).to(torch.int32) & 0xFFFF


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [R, F] below 2**bits (bits in {2, 4}) -> uint8 [R, ceil(F * bits / 8)], low bits first."""
    per_byte = 8 // bits
    rows, count = fields.shape
    fields = fields.to(torch.int32)
    padded = torch.nn.functional.pad(fields, (0, (-count) % per_byte)).view(rows, -1, per_byte)
    shifts = torch.arange(per_byte, device=fields.device, dtype=torch.int32) * bits
    return (padded << shifts).sum(-1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, count: int, bits: int, dtype=torch.uint8) -> torch.Tensor:
    """Inverse of pack_fields: uint8 [R, B] -> [R, count] of `dtype`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :count].to(dtype)
