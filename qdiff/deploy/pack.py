"""Integer weight codes in as few bytes as they need: 2-4 bits two per byte, 5-8 bits one per byte."""
from __future__ import annotations

import torch


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take when packed."""
    return (numel + 1) // 2 if bits <= 4 else numel


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits - 1] (any shape) -> a flat uint8 tensor; with <= 4 bits the even-indexed code of
    each pair is the low nibble."""
    if not 2 <= bits <= 8:
        raise ValueError(f"can only pack 2..8-bit codes, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 2 ** bits - 1:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes of ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} {bits}-bit codes")
    if bits > 4:
        return packed.reshape(shape).clone()
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel].reshape(shape).contiguous()
