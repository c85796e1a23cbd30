"""4-bit packing shared by int4 and nf4: two codes per byte, even element in the high nibble
(the layout torchao and tinygemm's converters start from)."""

from __future__ import annotations

import torch


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) integer codes in [0, 15] -> (..., K/2) uint8."""
    c = codes.to(torch.uint8)
    return (c[..., ::2] << 4) | c[..., 1::2]


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 codes."""
    hi = (packed >> 4) & 0xF
    lo = packed & 0xF
    return torch.stack([hi, lo], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, ...) -> (out, K/group_size, group_size) along the flattened reduction dim."""
    return w.reshape(w.shape[0], -1, group_size)
