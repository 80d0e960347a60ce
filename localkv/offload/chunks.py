"""Selected chunks of the tiered store on the device: read from whichever tier holds them, kept between steps.

A sparse policy attends to a few chunks of each layer's KV a step. This module is what such policies share:

    StoreChunks        one layer's chunks of K or V out of the store into device slots (GPU, pinned CPU, disk)
    ChunkBuffer        the device slots, an LRU cache per KV head: a step fetches only the chunks it misses
    attention_recall   the exact attention mass the attended tokens hold (for evaluation; keys kept by keep_keys)

**Reading chunks.** Chunks of one layer's keys or values are read out of the tiered store into device slots,
wherever they live.

Page p of a layer holds tokens ``p*P ..``; chunk c (tokens ``c*C ..``, C dividing P) sits in page ``c*C // P``
at token offset ``o = c*C % P``. A page is ``(parts, Hkv, P, D)`` (K and V, or V alone) with each head's tokens
contiguous, so a chunk of one head is one run of ``C*D`` elements. An arena of n pages (one tensor of a tier's
pool) is seen as a buffer ``(Hkv, rows, D)`` with head stride ``P*D`` and token stride ``D`` (the view
`block_attention_lse` uses); in it the chunk at offset o of the page in arena slot s is chunk number
``(s*parts*Hkv*P + o) / C``, counted from the K (or, shifted by ``Hkv*P*D`` elements, the V) of slot 0. The
segments of a layer are the arenas of its GPU-tier and CPU-tier pages and its open page (one page, on the
device), a handful, listed on the host when the layer's pages change, with a device page table (each page's
segment and first chunk number there). There is one list and one table per part: a store whose GPU tier
caches values (`KVStore.gpu_values`) reads a page's values from that copy and its keys from the page's home.
One `kernels.gather_pages` launch then moves every requested chunk of the layer from whichever segment holds
it, read by the GPU straight from pinned memory for the CPU tier.

Pages on disk need the host: when a layer has any, the requested chunks are read back once (one sync for the
layer) and their pages read through the store. The counts of chunks moved per tier accumulate on the device.
"""


from __future__ import annotations

import math
from typing import Iterator

import torch

from ..kernels import assign_slots, gather_pages, segment_addresses
from ..kernels.gather_pages import DISK_KIND
from .pages import KEYS, VALUES, PageGeometry
from .store import CPU, DISK, GPU, KVStore

DEVICE_TIER, CPU_TIER, DISK_TIER = 0, 1, DISK_KIND  # rows of the ``moved`` counters: chunks read from each


def _addresses(segments: dict[int, list[tuple[int, torch.Tensor, PageGeometry]]]) -> list:
    return [(part, [(k, a.data_ptr()) for k, a, _ in segs]) for part, segs in sorted(segments.items())]


def _arena_view(arena: torch.Tensor, index: int) -> torch.Tensor:
    """Pages (n, parts, Hkv, P, D) seen as (Hkv, rows, D) chunk buffers of their part at ``index``."""
    n, parts, Hkv, P, D = arena.shape
    rows = ((n - 1) * parts * Hkv + 1) * P   # up to the last page's keys/values of the last head, within storage
    return arena.as_strided((Hkv, rows, D), (P * D, D, 1), arena.storage_offset() + index * Hkv * P * D)


class StoreChunks:
    """Reads chunks of one layer out of ``store``: `fetch` into slots, `token_keys` as runs."""

    def __init__(self, store: KVStore, layer: int, chunk_tokens: int):
        self.store, self.layer, self.C = store, layer, chunk_tokens
        self.stale = True
        self.n_pages = -1
        self.segments: dict[int, list[tuple[int, torch.Tensor, PageGeometry]]] = {}   # per part: kind, arena, its pages
        self.seg_of: dict[int, torch.Tensor] | None = None
        self.base: dict[int, torch.Tensor] | None = None

    def _table(self) -> None:
        """(Re)build the page tables: per part, the segment of each page and its first chunk's number there."""
        store, layer = self.store, self.layer
        pages = store.pages[layer]
        if not self.stale and len(pages) == self.n_pages:
            return
        parts = (KEYS, VALUES) if store.geometry.parts == 2 else (VALUES,)
        apart = (KEYS, VALUES) if store.gpu_values else (VALUES,)   # parts whose pages can sit in other tiers
        tables = {part: self._part_table(part) for part in apart}
        # The tables are rewritten in place (grown by doubling), so a graphed step captured over them reads the
        # new pages of a later seal; the segments themselves are part of its `signature`.
        dev, m = store.device, len(pages) + 1
        if self.seg_of is None or self.seg_of[VALUES].numel() < m:
            size = max(m, 64, 2 * (self.seg_of[VALUES].numel() if self.seg_of is not None else 0))
            self.seg_of = {part: torch.full((size,), -1, dtype=torch.long, device=dev) for part in apart}
            self.base = {part: torch.zeros(size, dtype=torch.long, device=dev) for part in apart}
        for part, (_, seg_of, base) in tables.items():
            self.seg_of[part][:m].copy_(torch.tensor(seg_of))   # page -> segment, -1: disk
            self.base[part][:m].copy_(torch.tensor(base))       # page -> its first chunk
        for part in parts:   # K where V is: the same tables, read through views of the other part
            tables.setdefault(part, tables[VALUES])
            self.seg_of.setdefault(part, self.seg_of[VALUES])
            self.base.setdefault(part, self.base[VALUES])
        segments = {part: t[0] for part, t in tables.items()}
        if _addresses(segments) != _addresses(self.segments):
            self.kind = {part: torch.tensor([k for k, _, _ in segs], dtype=torch.long, device=dev)
                         for part, segs in segments.items()}
            self.views = {part: [_arena_view(a, g.part_index(part)) for _, a, g in segs]
                          for part, segs in segments.items()}
            self.addr = {part: segment_addresses(views, dev) for part, views in self.views.items()}
        self.segments = segments
        self.has_disk = {part: -1 in t[1] for part, t in tables.items()}
        self.n_pages = len(pages)
        self.stale = False

    def _part_table(self, part: int) -> tuple[list[tuple[int, torch.Tensor, PageGeometry]], list[int], list[int]]:
        """(segments: kind, arena and the geometry of its pages; the segment of each page; the first chunk of each
        page there) for reading ``part``. The open page is the last page and the last segment."""
        store, layer, C = self.store, self.layer, self.C
        per_slot = {tier: g.parts * g.n_kv_heads * g.page_tokens // C    # chunk numbers between arena slots
                    for tier, g in ((GPU, store.gpu.geometry), (CPU, store.cpu.geometry))}
        segments: list[tuple[int, torch.Tensor, PageGeometry]] = []
        ids: dict[tuple[str, int], int] = {}
        seg_of, base = [], []
        for entry in store.pages[layer]:
            tier, slot = store.locate(entry, part)
            if tier == DISK:
                seg_of.append(-1)
                base.append(0)
                continue
            pool = store.gpu if tier == GPU else store.cpu
            arena, s = divmod(slot, pool.arena_pages)
            if (tier, arena) not in ids:
                ids[tier, arena] = len(segments)
                segments.append((DEVICE_TIER if tier == GPU else CPU_TIER, pool.arenas[layer][arena], pool.geometry))
            seg_of.append(ids[tier, arena])
            base.append(s * per_slot[tier])
        seg_of.append(len(segments))
        base.append(0)
        segments.append((DEVICE_TIER, store.open[layer][None], store.geometry))
        return segments, seg_of, base

    def signature(self) -> tuple:
        """What a graphed `fetch` has baked in: the segments and the tables' addresses."""
        self._table()
        parts = sorted(self.segments)
        return (_addresses(self.segments), *(self.seg_of[p].data_ptr() for p in parts),
                *(self.base[p].data_ptr() for p in parts), *(self.kind[p].data_ptr() for p in parts),
                *(self.addr[p].data_ptr() for p in parts))

    def fetch(self, part: int, chunks: torch.Tensor, dst: torch.Tensor, out: torch.Tensor,
              moved: torch.Tensor | None = None) -> None:
        """Copy chunks of keys (``part`` KEYS) or values (VALUES) into slots of ``out``: one `kernels.gather_pages`
        launch for the pages on the device and in CPU memory, then the host for those on disk.

        Args:
            chunks: (Hkv, n) int64 chunk ids, all sealed or in the open page (below the layer's length).
            dst: (Hkv, n) int64 slot in ``out`` per entry; -1 skips the entry.
            out: (Hkv, n_slots*C, D) on the device, the store's dtype.
            moved: optional (3,) int64 counters, chunks read from the device / CPU / disk tier, added to.
        """
        self._table()
        C, P = self.C, self.store.geometry.page_tokens
        gather_pages(self.views[part], self.seg_of[part], self.base[part], chunks, dst, out, chunk_tokens=C,
                     page_tokens=P, addr=self.addr[part], kind=self.kind[part] if moved is not None else None,
                     moved=moved)
        if self.has_disk[part]:
            seg = self.seg_of[part][chunks * C // P]
            self._from_disk(part, chunks, torch.where(seg < 0, dst, -1), out)

    def _from_disk(self, part: int, chunks: torch.Tensor, dst: torch.Tensor, out: torch.Tensor) -> None:
        """The entries on disk (``dst`` >= 0): their pages read by the host through the store."""
        h, j = (dst >= 0).nonzero(as_tuple=True)                # the one host sync, for layers with disk pages
        if h.numel() == 0:
            return
        g = self.store.geometry
        C, P, D = self.C, g.page_tokens, g.head_dim
        tok = chunks[h, j] * C
        pages, which = torch.unique(tok // P, return_inverse=True)
        data = torch.stack([self.store.read_page(self.layer, int(p)) for p in pages.tolist()])  # (u, parts, Hkv, P, D)
        data = data[:, g.part_index(part)]                                                       # (u, Hkv, P, D)
        runs = data.reshape(len(pages), g.n_kv_heads, P // C, C * D)[which, h, (tok % P) // C]
        out.view(g.n_kv_heads, -1, C * D)[h, dst[h, j]] = runs.to(out.device)

    def token_runs(self, part: int, a: int, b: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Keys (part KEYS) or values (VALUES) of tokens a..b-1 as (first position, (Hkv, t, D) on the device) runs,
        page by page (a slow path: truncation, basis refresh, outliers that were not at hand)."""
        store, P = self.store, self.store.geometry.page_tokens
        index = store.geometry.part_index(part)
        n_sealed = len(store.pages[self.layer])
        pos = a
        while pos < b:
            p = pos // P
            page = store.read_page(self.layer, p) if p < n_sealed else store.open_page(self.layer)
            end = min(b, (p + 1) * P)
            yield pos, page[index, :, pos - p * P:end - p * P]
            pos = end

    def invalidate(self) -> None:
        """The layer's pages moved other than by sealing (truncation): list them again before the next fetch."""
        self.stale = True


class ChunkBuffer:
    """Device slots holding the rebuilt keys and fetched values of selected chunks, per KV head.

    ``k``, ``v`` are (Hkv, n_slots*C, D): slot s of head h is rows s*C .. s*C+C-1, the layout
    `kernels.sparse_attention` reads through an index list. ``slot_chunk`` (Hkv, n_slots+1) says which chunk
    each slot holds (-1: none) and ``chunk_slot`` (Hkv, n_chunks+1) the reverse; their last column is a
    scratch target for masked scatters. A step's selection keeps the slots of its hits and puts each miss in
    the least recently used slot no hit holds (`kernels.assign_slots`); with ``n_slots >= k`` there are always
    enough.
    """

    def __init__(self, n_kv_heads: int, chunk_tokens: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, slot_factor: float = 2.0):
        self.Hkv, self.C, self.D = n_kv_heads, chunk_tokens, head_dim
        self.dtype, self.device = dtype, device
        self.slot_factor = slot_factor
        self.n_slots = 0
        self.n_chunks = 0
        self.step = torch.zeros(n_kv_heads, dtype=torch.int32, device=device)  # on the device: graphs replay assign
        self._alloc(0, 0)

    def _alloc(self, n_slots: int, n_chunks: int) -> None:
        Hkv, C, D, dev = self.Hkv, self.C, self.D, self.device
        self.k = torch.zeros(Hkv, n_slots * C, D, dtype=self.dtype, device=dev)
        self.v = torch.zeros(Hkv, n_slots * C, D, dtype=self.dtype, device=dev)
        self.slot_chunk = torch.full((Hkv, n_slots + 1), -1, dtype=torch.long, device=dev)
        self.slot_age = torch.zeros(Hkv, n_slots + 1, dtype=torch.int32, device=dev)  # int32: the kernel's keys
        self.chunk_slot = torch.full((Hkv, n_chunks + 1), -1, dtype=torch.long, device=dev)
        self.n_slots, self.n_chunks = n_slots, n_chunks

    def reserve(self, k: int, n_chunks: int) -> None:
        """Room for a selection of ``k`` chunks among ``n_chunks`` (a resize empties the buffer)."""
        if k > self.n_slots:
            self._alloc(max(k, math.ceil(k * self.slot_factor)), max(n_chunks, self.n_chunks))
        if n_chunks > self.n_chunks:
            grown = torch.full((self.Hkv, 2 * n_chunks + 1), -1, dtype=torch.long, device=self.device)
            grown[:, :self.n_chunks] = self.chunk_slot[:, :self.n_chunks]
            self.chunk_slot, self.n_chunks = grown, 2 * n_chunks

    def assign(self, sel: torch.Tensor, hits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the chunks ``sel (Hkv, k)`` (distinct per head): `kernels.assign_slots`.

        Returns:
            slots (Hkv, k): where each selected chunk is (or will be once fetched);
            dst (Hkv, k): the slot to fetch into, -1 for hits (the fetch's skip mask).
        ``hits``, an optional int64 counter, is added the number of hits.
        """
        return assign_slots(sel, self.chunk_slot, self.slot_chunk, self.slot_age, self.step, self.n_slots, hits)

    def forget_from(self, chunk: int) -> None:
        """Drop every buffered chunk from ``chunk`` on (their tokens were truncated and may come back different)."""
        stale = self.slot_chunk[:, :self.n_slots] >= chunk
        self.slot_chunk[:, :self.n_slots].masked_fill_(stale, -1)
        self.slot_age[:, :self.n_slots].masked_fill_(stale, 0)
        self.chunk_slot[:, chunk:self.n_chunks] = -1

    def device_bytes(self) -> int:
        held = (self.k, self.v, self.slot_chunk, self.slot_age, self.chunk_slot)
        return sum(t.numel() * t.element_size() for t in held)

    def buffers(self) -> tuple[int, ...]:
        """Addresses a graphed step reads: they change when `reserve` grows the buffer."""
        return tuple(t.data_ptr() for t in (self.k, self.v, self.slot_chunk, self.slot_age, self.chunk_slot))


def keep_keys(all_k: torch.Tensor | None, start: int, kt: torch.Tensor) -> torch.Tensor:
    """``all_k`` (Hkv, >= n, D) with the rotated keys ``kt`` (Hkv, T, D) of tokens start.. written in, grown by
    doubling: every key kept aside for `attention_recall` (evaluation only)."""
    end = start + kt.shape[1]
    if all_k is None or all_k.shape[1] < end:
        grown = torch.zeros(kt.shape[0], max(end, 2 * start, 256), kt.shape[2], dtype=kt.dtype, device=kt.device)
        if all_k is not None:
            grown[:, :start] = all_k[:, :start]
        all_k = grown
    all_k[:, start:end] = kt
    return all_k


def attention_recall(q: torch.Tensor, keys: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Share of each query head's exact softmax attention that falls on the covered tokens.

    Args:
        q: (T, Hq, D) post-RoPE queries of the newest T tokens.
        keys: (Hkv, n, D) every rotated key so far, the last T being the queries' own (causal).
        covered: (Hkv, n) bool, the tokens the policy attended.

    Returns:
        (T, Hq) fp32 recall in [0, 1].
    """
    T, Hq, D = q.shape
    Hkv, n, _ = keys.shape
    G = Hq // Hkv
    qg = q.float().transpose(0, 1).reshape(Hkv, G * T, D)       # rows (g, t)
    s = (qg @ keys.float().transpose(1, 2)) * D ** -0.5         # (Hkv, G*T, n)
    rows = torch.arange(T, device=q.device).repeat(G)[:, None] + (n - T)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(s, dim=-1)
    recall = (p * covered[:, None, :]).sum(-1)                  # (Hkv, G*T)
    return recall.reshape(Hq, T).T


def add_recall(totals: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, covered: torch.Tensor) -> None:
    """Add a step's `attention_recall` to ``totals`` (2,) fp64: Σ recall over its (token, head) rows, and the rows."""
    recall = attention_recall(q, keys, covered)
    totals[0] += recall.sum().double()
    totals[1] += recall.numel()
