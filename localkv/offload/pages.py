"""Pages: the unit of KV allocation and of movement between tiers.

A page holds ``page_tokens`` consecutive tokens of one layer, K and V of every KV head, laid out
``(2, Hkv, page_tokens, D)``: K at [0], V at [1], and within each a run of tokens of one head is contiguous
(``page_tokens * D`` elements), so sub-runs of a page can be gathered straight from pinned memory. A store of
values only (``parts=1``: for a policy that rebuilds keys from an index of its own, `Policy.store_parts`) has
pages ``(1, Hkv, page_tokens, D)``, V at [0]; `PageGeometry.part_index` says where K or V sits in either.
KV is append-only: a full ("sealed") page never changes, so a page written to disk is never dirty.
The page being filled (the "open" page of each layer) stays in device memory until it is full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ContextOverflowError
from ..units import format_bytes

DISK_ALIGN = 4096  # O_DIRECT needs offsets, sizes and buffers aligned to the logical block size
KEYS, VALUES = 0, 1  # the parts of a page, as callers name them (`PageGeometry.part_index`: where each sits)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """``torch.empty`` in pinned CPU memory. When the host cannot pin that much, a one-line
    ContextOverflowError says how much was asked and for what, instead of a CUDA error."""
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    except (RuntimeError, MemoryError) as e:   # cudaHostAlloc failed
        n = math.prod(shape) * dtype.itemsize
        reason = (str(e).strip().splitlines() or ["out of memory"])[0]
        raise ContextOverflowError(f"could not pin {format_bytes(n)} of CPU memory for {what} ({reason}); "
                                   "lower --ctx or --cpu-mem") from None


@dataclass(frozen=True)
class PageGeometry:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    page_tokens: int
    dtype: torch.dtype
    parts: int = 2
    """Tensors a page holds: 2 is K and V, 1 is V alone (a policy that keeps no exact keys)."""

    def __post_init__(self):
        if self.parts not in (1, 2):
            raise ValueError(f"a page holds K and V (parts=2) or V alone (parts=1), not parts={self.parts}")

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.parts, self.n_kv_heads, self.page_tokens, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return self.parts * self.n_kv_heads * self.page_tokens * self.head_dim * self.dtype.itemsize

    def part_index(self, part: int) -> int:
        """Where ``KEYS`` or ``VALUES`` sit along a page's first axis: V is always the last part."""
        if part == KEYS and self.parts == 1:
            raise ValueError("this store keeps values only (parts=1): its pages hold no keys")
        return part - 2 + self.parts

    @property
    def slot_bytes(self) -> int:
        """Bytes a page takes in a disk file: the page rounded up to the O_DIRECT alignment."""
        return -(-self.page_bytes // DISK_ALIGN) * DISK_ALIGN

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers."""
        return self.n_layers * self.page_bytes // self.page_tokens

    def n_pages(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)


class PagePool:
    """Fixed-size page slots in one memory (device, or host memory pinned when a GPU is present).

    Each layer has its own arenas of ``arena_pages`` slots, taken as first needed, so a large budget costs
    nothing until the conversation grows into it, and a layer's pages, sealed in order, sit in consecutive
    slots: a run of them moves in one copy. ``pages_per_layer`` is each layer's share of the tier's budget
    (every layer holds the same tokens, so equal shares waste nothing).
    """

    def __init__(self, geometry: PageGeometry, pages_per_layer: int, device: torch.device, pin: bool = False,
                 arena_pages: int = 64):
        self.geometry = geometry
        self.pages_per_layer = pages_per_layer
        self.device = device
        self.pin = pin
        self.arena_pages = max(1, arena_pages)
        self.arenas: list[list[torch.Tensor]] = [[] for _ in range(geometry.n_layers)]
        self.free: list[list[int]] = [[] for _ in range(geometry.n_layers)]
        self.allocated = [0] * geometry.n_layers  # slots backed by memory
        self.used_per_layer = [0] * geometry.n_layers
        self.used = 0

    def alloc(self, layer: int) -> int | None:
        """A free slot id of ``layer``, or None when the layer's share of the budget is used."""
        if self.used_per_layer[layer] >= self.pages_per_layer:
            return None
        if not self.free[layer]:
            n = min(self.arena_pages, self.pages_per_layer - self.allocated[layer])
            shape = (n, *self.geometry.page_shape)
            arena = (pinned_empty(shape, self.geometry.dtype, "KV pages") if self.pin
                     else torch.empty(shape, dtype=self.geometry.dtype, device=self.device))
            base = len(self.arenas[layer]) * self.arena_pages
            self.arenas[layer].append(arena)
            self.allocated[layer] += n
            self.free[layer].extend(range(base + n - 1, base - 1, -1))
        self.used += 1
        self.used_per_layer[layer] += 1
        return self.free[layer].pop()

    def release(self, layer: int, slot: int) -> None:
        self.used -= 1
        self.used_per_layer[layer] -= 1
        self.free[layer].append(slot)

    def page(self, layer: int, slot: int) -> torch.Tensor:
        """The (parts, Hkv, P, D) view of a slot."""
        return self.arenas[layer][slot // self.arena_pages][slot % self.arena_pages]

    def run(self, layer: int, slot: int, n: int) -> torch.Tensor | None:
        """Slots slot..slot+n-1 as one (n, parts, Hkv, P, D) view when they share an arena, else None."""
        a, i = divmod(slot, self.arena_pages)
        arena = self.arenas[layer][a]
        return arena[i:i + n] if i + n <= arena.shape[0] else None

    @property
    def capacity_bytes(self) -> int:
        return self.pages_per_layer * self.geometry.n_layers * self.geometry.page_bytes

    @property
    def used_bytes(self) -> int:
        return self.used * self.geometry.page_bytes
