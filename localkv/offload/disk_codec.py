"""Quantized pages on the disk tier: cold KV stored as int8 or int4 codes, read back a 16-token unit at a time.

A store made with a `QuantizedPages` codec writes each page it sends to disk encoded, at the bits a policy
picks for it (`KVStore.disk_bits`), and decodes what it reads. The encoding is KIVI's (`kernels.kv_quant`):
keys per channel over the page's tokens, values per token over all D channels, ``x ≈ q·scale + zero`` with
``|x - x̂| <= scale / 2``. The disk gets only the codes, laid out for reading a few selected units:

    codes of a page = [unit (head 0, unit 0) | unit (0, 1) | ... | unit (Hkv-1, U-1)]
    one unit        = K codes (16, D·bits/8) | V codes (16, D·bits/8)     int8, D = 128: 4,096 bytes

so a unit's K and V are one aligned 4 KB disk block at int8 (half of one at int4) where the page in bf16 keeps
them in two blocks: a selected unit costs half the disk reads. The scales and zeros (fp16; per head, ``D`` of
them for the keys and one per token for the values: 1.2% of the bf16 page for D = 128) stay in host memory
beside the disk tier (`DiskTier.meta`), so reading a unit needs nothing else from disk. An int8 page takes 0.5
of the bf16 page's disk bytes, an int4 page 0.25. Every slot is sized for int8; an int4 page writes only its
own bytes, so the rest of its slot stays a hole in the file.
"""

from __future__ import annotations

import torch

from ..kernels import dequantize_page, quantize_page_ref
from .pages import DISK_ALIGN, KEYS, PageGeometry

UNIT = 16
"""Tokens per unit: the granule a policy reads."""
BITS = (8, 4)


def disk_ratio(n_kv_heads: int, head_dim: int, page_tokens: int, bits: int) -> float:
    """Disk bytes of a page quantized at ``bits`` over its bytes in bf16, for the planner (scales stay in host
    memory)."""
    geometry = PageGeometry(1, n_kv_heads, head_dim, page_tokens, torch.bfloat16)
    return QuantizedPages(geometry).page_bytes(bits) / geometry.page_bytes


class QuantizedPages:
    """Encode and decode one geometry's pages (``(parts, Hkv, P, D)``) at 8 or 4 bits per element."""

    def __init__(self, geometry: PageGeometry, default_bits: int = 8):
        if geometry.page_tokens % UNIT or geometry.head_dim % 2:
            raise ValueError(f"quantized pages need page_tokens a multiple of {UNIT} and an even head_dim")
        if default_bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {default_bits}")
        self.geometry = geometry
        self.default_bits = default_bits
        self.units = geometry.page_tokens // UNIT
        self.slot_bytes = -(-self.page_bytes(8) // DISK_ALIGN) * DISK_ALIGN

    # -- layout ----------------------------------------------------------------------------------------------
    def _keys(self, part: int) -> bool:
        return self.geometry.parts == 2 and part == KEYS

    def code_bytes(self, bits: int) -> int:
        """Bytes of one part's codes of one (head, unit)."""
        return UNIT * self.geometry.head_dim * bits // 8

    def page_bytes(self, bits: int) -> int:
        """Bytes of a page's codes: what goes to disk."""
        g = self.geometry
        return g.n_kv_heads * self.units * g.parts * self.code_bytes(bits)

    def span(self, part: int, head: int, unit: int, bits: int) -> tuple[int, int]:
        """(first byte, bytes) of the codes of (``head``, ``unit``) of ``part`` in a page's codes."""
        cb = self.code_bytes(bits)
        return ((head * self.units + unit) * self.geometry.parts + part) * cb, cb

    def meta_bytes(self) -> int:
        """Host bytes of a page's scales and zeros."""
        g = self.geometry
        return g.n_kv_heads * 2 * 2 * ((g.head_dim if g.parts == 2 else 0) + g.page_tokens)

    # -- coding ----------------------------------------------------------------------------------------------
    def encode(self, page: torch.Tensor, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A page (parts, Hkv, P, D) -> (codes: ``page_bytes(bits)`` uint8, meta: (Hkv, 2, D + P) fp16: scale and
        zero of the keys' channels, then of the values' tokens; (Hkv, 2, P) for a store of values only)."""
        g = self.geometry
        bits = bits or self.default_bits
        Hkv, P, D, U = g.n_kv_heads, g.page_tokens, g.head_dim, self.units
        codes, meta = [], []
        for part in range(g.parts):
            key = self._keys(part)
            # torch's ops, on the page's device (the GPU where there is one): the Triton kernel is tested for the
            # groups of 64 tokens or fewer that KV pages in memory use, not for a key group of a whole page
            packed, scale, zero = quantize_page_ref(page[part], kind="key" if key else "value", bits=bits,
                                                    group=P if key else D, scale_dtype=torch.float16)
            codes.append(packed.reshape(Hkv, U, 1, -1))                           # (Hkv, U, 1, 16·D·bits/8)
            meta.append(torch.stack([scale.reshape(Hkv, -1), zero.reshape(Hkv, -1)], 1))   # (Hkv, 2, D | P)
        return torch.cat(codes, 2).reshape(-1), torch.cat(meta, 2)

    def units_meta(self, meta: torch.Tensor, part: int, heads: torch.Tensor, units: torch.Tensor,
                   lead: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """The scales and zeros units decode with, in one gather: ``meta`` (..., Hkv, 2, D + P) (the ``encode``
        meta of a page, or of many with their leading indices in ``lead``), the units' KV heads and unit indices
        (n,) int64 -> (n, 2, D) of keys' channels, or (n, 2, 16) of values' tokens."""
        D = self.geometry.head_dim if self.geometry.parts == 2 else 0
        if self._keys(part):
            cols = torch.arange(D).expand(len(heads), D)
        else:
            cols = (D + units * UNIT)[:, None] + torch.arange(UNIT)
        index = (*(i[:, None] for i in lead), heads[:, None], slice(None), cols)
        return meta[index].permute(0, 2, 1)   # advanced indices first: (n, cols, 2) -> (n, 2, cols)

    def decode_units(self, codes: torch.Tensor, meta: torch.Tensor, part: int, bits: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """Units' codes (n, code_bytes) uint8 and their `units_meta` (n, 2, ·) fp16 of ``part`` -> the units
        (n, 16, D) in ``dtype``, on the codes' device."""
        n, D = codes.shape[0], self.geometry.head_dim
        key = self._keys(part)
        shape = (n, 1, D) if key else (n, UNIT, 1)
        scale, zero = meta[:, 0].contiguous().view(shape), meta[:, 1].contiguous().view(shape)
        return dequantize_page(codes.reshape(n, UNIT, -1), scale, zero, kind="key" if key else "value", bits=bits,
                               group=UNIT if key else D, dtype=dtype)

    def decode(self, codes: torch.Tensor, meta: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        """A page's codes (at least ``page_bytes(bits)`` uint8) and meta -> the page (parts, Hkv, P, D)."""
        g = self.geometry
        units = codes[:self.page_bytes(bits)].view(g.n_kv_heads, self.units, g.parts, -1)
        heads = torch.arange(g.n_kv_heads).repeat_interleave(self.units)      # (head, unit) of each unit, in order
        index = torch.arange(self.units).repeat(g.n_kv_heads)
        parts = []
        for part in range(g.parts):
            got = self.decode_units(units[:, :, part].reshape(g.n_kv_heads * self.units, -1),
                                    self.units_meta(meta, part, heads, index).to(codes.device), part, bits, dtype)
            parts.append(got.view(g.n_kv_heads, g.page_tokens, -1))
        return torch.stack(parts)
