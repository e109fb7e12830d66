"""Vectorised bit packing shared by the formats (little bit order: bit j of byte b is element 8b+j,
as numpy.packbits(..., bitorder="little") writes it)."""

from __future__ import annotations

import torch

_WEIGHTS = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = (1 << torch.arange(8, device=device, dtype=torch.int32)).to(torch.uint8)
    return _WEIGHTS[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [R, C] -> uint8 [R, ceil(C / 8)]."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask, (0, (-cols) % 8)).view(rows, -1, 8)
    return (padded.to(torch.uint8) * _bit_weights(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [R, B] -> bool [R, cols]."""
    bits = packed.unsqueeze(-1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, F] of values < 2**bits (bits in {2, 4}) -> uint8 [R, ceil(F * bits / 8)], low bits first."""
    per_byte = 8 // bits
    rows, count = fields.shape
    padded = torch.nn.functional.pad(fields, (0, (-count) % per_byte)).view(rows, -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=fields.device, dtype=torch.int32) * bits
    return (padded << shifts).sum(-1).to(torch.uint8)


def unpack_fields(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of pack_fields: uint8 [R, B] -> uint8 [R, count]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :count].to(torch.uint8)
