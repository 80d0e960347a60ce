"""The selected chunks' bytes on disk, read block by block by a thread pool into a bounded host cache, prefetched.

A decode step's chunks that live on disk are the only ones the host must read (`offload.chunks.StoreChunks`
reads every other tier with one gather). Disk is read only for what is used: a 16-token unit of one KV head is
one contiguous run of its page (4 KB for D = 128 in bf16, its K and V codes together in one 4 KB block for a
quantized page), so the reader fetches the 4096-byte blocks that hold the selected runs, never whole pages.

A step at 1M tokens asks for thousands of blocks per layer, so nothing here loops over blocks in Python: a
block is named by a *key* (``page * blocks_per_slot + block``, per layer), and `DiskBlocks` keeps

    pool       (capacity, 4096) uint8, one mmap: the host cache, filled in FIFO order
    where      per layer, key -> pool row (-1: not cached), a dense array indexed by key
    owner      pool row -> (layer, key), to unmap a row when it is reused
    batch      pool row -> the read filling it, while in flight

and works on arrays of keys:

    request(layer, keys, slots)   map the keys not cached to the next pool rows and read them on ``io_threads``
                                  threads: consecutive blocks of a page as one ``preadv``, the runs split into
                                  one batch per thread (`DiskTier.read_runs`, which also checks every block)
    get(layer, keys, slots)       the keys' blocks (n, 4096), waiting only for reads still in flight
    prefetch(layer, blocks)       `request` for a layer before it runs: layer l issues layer l+1's blocks of its
                                  previous step (the last layer, layer 0's of the next step), read while l computes;
                                  skipped for a layer whose prefetches its steps mostly did not use (below
                                  `PREFETCH_USEFUL`, tried again every `PREFETCH_RETRY` steps): on a disk that is
                                  bound by its reads a second, useless stream halves the useful one
    forget_from(layer, p)         drop pages p.. (truncation: their slots may be rewritten with other tokens)

A row is reused only after ``capacity`` newer blocks were asked for; the cache holds at least four layers' worth
of a full step (``min_blocks``), so a block requested for a step is still there when the step gets it (a block
that is not is simply read again). Blocks are immutable while cached: a sealed page never changes, and
truncation, the one way a page index gets new tokens, drops the pages it cuts after waiting for reads in flight.

``io_threads=0`` reads in the calling thread, with no cache: the synchronous path the threaded one must equal.
Stats: ``wait_s`` (decode thread blocked on disk), ``requests`` / ``hits`` (blocks asked for by a step / found
cached or already in flight), ``bytes_read`` (bytes actually read from disk).
"""

from __future__ import annotations

import mmap
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .chunks import StoreChunks
from .disk import run_items
from .pages import DISK_ALIGN, KEYS, VALUES
from .store import KVStore

BLOCK = DISK_ALIGN
"""Bytes per block: the unit of disk reads and of the host cache."""

Blocks = tuple[np.ndarray, np.ndarray]
"""(keys, disk slots of their pages) of a layer's blocks, int64 arrays of one length."""

_EMPTY: Blocks = (np.zeros(0, np.int64), np.zeros(0, np.int64))

PREFETCH_USEFUL = 0.25
"""A layer's prefetch goes on while at least this share of what it read was asked for by the step (running mean)."""
PREFETCH_RETRY = 8
"""Steps between tries of a layer's skipped prefetch (a selection that starts repeating is noticed)."""


def _aligned(rows: int) -> np.ndarray:
    """(rows, BLOCK) uint8 over an anonymous mmap: page-aligned, as O_DIRECT reads need."""
    return np.frombuffer(mmap.mmap(-1, max(1, rows) * BLOCK), np.uint8).reshape(max(1, rows), BLOCK)


def _runs(keys: np.ndarray, slots: np.ndarray, rows: np.ndarray, per_slot: int):
    """Split sorted keys into runs a ``preadv`` reads at once: consecutive blocks of one page into consecutive
    rows. Returns (disk slot, first block, count, first row) per run."""
    cut = (np.diff(keys) != 1) | (np.diff(slots) != 0) | (np.diff(rows) != 1)
    starts = np.concatenate([[0], np.flatnonzero(cut) + 1])
    counts = np.diff(np.concatenate([starts, [len(keys)]]))
    return slots[starts], keys[starts] % per_slot, counts, rows[starts]


class DiskBlocks:
    """Host-side cache and reader threads for the store's disk pages, in blocks (one per cache, all layers)."""

    def __init__(self, store: KVStore, io_threads: int = 4, cache_bytes: int = 64 << 20, min_blocks: int = 0):
        self.store = store
        self.io_threads = io_threads
        self.per_slot = store.disk.slot_blocks if store.disk is not None else 1
        self.capacity = max(1, cache_bytes // BLOCK, min_blocks) if io_threads else 0
        self.pool = _aligned(self.capacity) if io_threads else None
        self.threads = ThreadPoolExecutor(io_threads, thread_name_prefix="leoam-io") if io_threads else None
        L = store.geometry.n_layers
        self.where = [np.full(0, -1, np.int64) for _ in range(L)]
        self.owner_layer = np.full(self.capacity, -1, np.int64)
        self.owner_key = np.full(self.capacity, -1, np.int64)
        self.batch = np.full(self.capacity, -1, np.int64)
        self.pending: dict[int, Future] = {}
        self.batches = 0
        self.hand = 0
        self.wait_s = 0.0
        self.requests = self.hits = self.bytes_read = 0
        self.prefetched: list[np.ndarray | None] = [None] * L   # keys of each layer's last prefetch
        self.useful = np.full(L, 0.5)                            # running share of them its steps asked for
        self.skipped = np.zeros(L, np.int64)                     # prefetches skipped in a row
        self.prefetches = self.prefetches_skipped = 0

    def _count(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.store.moved.disk_read += nbytes

    def _rows(self, layer: int, keys: np.ndarray) -> np.ndarray:
        """Pool rows of ``keys`` (-1: not cached), growing the layer's map to cover them."""
        where = self.where[layer]
        if len(keys) and keys.max() >= len(where):
            grown = np.full(max(int(keys.max()) + 1, 2 * len(where)), -1, np.int64)
            grown[:len(where)] = where
            self.where[layer] = where = grown
        return where[keys]

    def _wait(self, batches: np.ndarray, drop: bool = False) -> None:
        """Wait for the reads ``batches`` (re-raising a read's error unless ``drop``)."""
        for b in np.unique(batches[batches >= 0]).tolist():
            future = self.pending.get(b)
            if future is None:
                continue
            error = future.exception()
            if error is not None and not drop:
                rows = np.flatnonzero(self.batch == b)   # unmapped, so that a later step reads them again
                self._unmap(rows)
                self.pending.pop(b)
                raise error
            self.pending.pop(b)

    def _unmap(self, rows: np.ndarray) -> None:
        held = rows[self.owner_key[rows] >= 0]
        for layer in np.unique(self.owner_layer[held]).tolist():
            mine = held[self.owner_layer[held] == layer]
            self.where[layer][self.owner_key[mine]] = -1
        self.owner_key[rows] = -1
        self.batch[rows] = -1

    def _submit(self, layer: int, keys: np.ndarray, slots: np.ndarray) -> None:
        """Start reading ``keys`` (unique, sorted; pages in disk ``slots``) not cached or in flight."""
        miss = (self._rows(layer, keys) < 0) & (slots >= 0)   # slot -1: no longer on disk (a stale prefetch)
        keys, slots = keys[miss][-self.capacity:], slots[miss][-self.capacity:]
        m = len(keys)
        if m == 0:
            return
        rows = (self.hand + np.arange(m)) % self.capacity
        self.hand = (self.hand + m) % self.capacity
        self._wait(self.batch[rows], drop=True)   # a read still filling a reused row (the ring went round)
        self._unmap(rows)
        self.where[layer][keys] = rows
        self.owner_layer[rows], self.owner_key[rows] = layer, keys
        runs = _runs(keys, slots, rows, self.per_slot)
        n_runs = len(runs[0])
        for group in np.array_split(np.arange(n_runs), min(self.io_threads, n_runs)):
            run_slots, firsts, counts, starts = (r[group] for r in runs)
            b = self.batches
            self.batches += 1
            self.pending[b] = self.threads.submit(self.store.disk.read_runs, layer, run_slots, firsts, counts,
                                                  self.pool, starts)
            self.batch[run_items(starts, counts)] = b
        self._count(m * BLOCK)

    def request(self, layer: int, keys: np.ndarray, slots: np.ndarray) -> None:
        """Start reading the blocks of ``layer`` a step needs (counted as requests)."""
        if self.threads is None:
            return
        self.requests += len(keys)
        self.hits += int((self._rows(layer, keys) >= 0).sum())
        fetched, self.prefetched[layer] = self.prefetched[layer], None
        if fetched is not None and len(fetched):
            self.useful[layer] = 0.5 * self.useful[layer] + 0.5 * np.isin(fetched, keys).mean()
        self._submit(layer, keys, slots)

    def prefetch(self, layer: int, blocks: Blocks) -> None:
        """Start reading blocks a later step will likely ask for (not counted as requests), unless this layer's
        prefetches have mostly gone unused."""
        if self.threads is None or not len(blocks[0]):
            return
        if self.useful[layer] < PREFETCH_USEFUL and self.skipped[layer] < PREFETCH_RETRY:
            self.skipped[layer] += 1
            self.prefetches_skipped += 1
            return
        self.skipped[layer] = 0
        self.prefetches += 1
        self.prefetched[layer] = blocks[0]
        self._submit(layer, *blocks)

    def get(self, layer: int, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The blocks ``keys`` of ``layer`` (pages in disk ``slots``), (n, BLOCK) uint8 on the host; blocks only
        for reads in flight."""
        t = time.perf_counter()
        if self.threads is None:
            order = np.argsort(keys, kind="stable")
            out = _aligned(len(keys))
            runs = _runs(keys[order], slots[order], np.arange(len(keys)), self.per_slot)
            self.store.disk.read_runs(layer, *runs[:3], out, runs[3])
            self._count(len(keys) * BLOCK)
            self.requests += len(keys)
            data = np.empty_like(out[:len(keys)])
            data[order] = out[:len(keys)]
        else:
            rows = self._rows(layer, keys)
            if (rows < 0).any():   # evicted since `request` (a step larger than the cache)
                lost = np.unique(keys[rows < 0])
                self._submit(layer, lost, self._slots_of(keys, slots, lost))
                rows = self._rows(layer, keys)
            self._wait(self.batch[rows])   # re-raises a read error (a bad checksum) here, on the decode thread
            data = self.pool[rows]
        self.wait_s += time.perf_counter() - t
        return data

    @staticmethod
    def _slots_of(keys: np.ndarray, slots: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """The disk slot of each key in ``wanted`` (all in ``keys``)."""
        order = np.argsort(keys, kind="stable")
        return slots[order][np.searchsorted(keys[order], wanted)]

    def forget_from(self, layer: int, page: int) -> None:
        """Drop pages ``page``.. of ``layer`` (after their reads finish: the store is about to reuse their slots)."""
        where = self.where[layer]
        tail = where[page * self.per_slot:]
        rows = tail[tail >= 0]
        self._wait(self.batch[rows], drop=True)
        self._unmap(rows)

    def drain(self) -> None:
        """Wait for every read in flight."""
        self._wait(self.batch, drop=True)

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown(wait=True, cancel_futures=True)


class LayerChunks(StoreChunks):
    """`StoreChunks` whose disk entries come through `DiskBlocks` (threaded, cached, prefetched, only the blocks
    that hold them) instead of one synchronous `KVStore.read_page` per page and part. ``disk_blocks`` holds the
    blocks (keys and disk slots) this layer's last step read, keys and values (`begin_step` clears it): the next
    step's prefetch for it."""

    def __init__(self, store: KVStore, layer: int, chunk_tokens: int, reader: DiskBlocks):
        super().__init__(store, layer, chunk_tokens)
        self.reader = reader
        self.disk_blocks: Blocks = _EMPTY
        self.disk_slot = np.zeros(0, np.int64)

    def begin_step(self) -> None:
        self.disk_blocks = _EMPTY

    def _table(self) -> None:
        rebuild = self.stale or len(self.store.pages[self.layer]) != self.n_pages
        super()._table()
        if rebuild:   # page -> its disk slot (-1: not on disk), for the vectorized reads below
            self.disk_slot = np.array([e.disk for e in self.store.pages[self.layer]] + [-1], np.int64)

    def _spans(self, part: int, h: np.ndarray, tok: np.ndarray, slot: np.ndarray):
        """(byte offset in its page's slot, bytes, bits) of each entry's run of ``part``; bits None for pages
        stored as they are."""
        g, disk = self.store.geometry, self.store.disk
        P, D, Hkv, C = g.page_tokens, g.head_dim, g.n_kv_heads, self.C
        if disk.codec is None:   # a chunk of one head and part is one run of its page
            size = C * D * g.dtype.itemsize
            return ((g.part_index(part) * Hkv + h) * P + tok % P) * (size // C), np.full(len(h), size), None
        # its codes in the page's encoding, at the page's bits: [K | V] per (head, unit), `disk_codec`
        bits = disk.bits[self.layer][slot].astype(np.int64)
        size = C * D * bits // 8
        units = P // C
        return ((h * units + tok % P // C) * g.parts + g.part_index(part)) * size, size, bits

    def _keys(self, page: np.ndarray, offset: np.ndarray, size: np.ndarray) -> np.ndarray:
        """(n, the most blocks a run spans) keys of each run's blocks; a run that spans fewer repeats its own last
        block (a block past it may lie past what its page wrote, or in the next page's slot)."""
        last = (offset + size - 1) // BLOCK
        span = int((last - offset // BLOCK).max()) + 1
        base = page[:, None] * self.reader.per_slot
        return base + np.minimum(offset[:, None] // BLOCK + np.arange(span), last[:, None])

    def _from_disk(self, part: int, chunks: torch.Tensor, dst: torch.Tensor, out: torch.Tensor) -> None:
        """The entries on disk (``dst`` >= 0): the blocks holding their bytes (keys and values, asked for together
        at the first part) read in parallel, each entry's bytes cut out of its blocks on the host, decoded where
        the pages are quantized, and copied to its slot."""
        h, j = (dst >= 0).nonzero(as_tuple=True)                 # the one host sync, for layers with disk pages
        if h.numel() == 0:
            return
        g, disk = self.store.geometry, self.store.disk
        C, P, D, Hkv = self.C, g.page_tokens, g.head_dim, g.n_kv_heads
        assert disk.codec is None or C == g.page_tokens // disk.codec.units, "quantized pages are read by unit"
        tok, hh = (chunks[h, j] * C).cpu().numpy(), h.cpu().numpy()
        page = tok // P
        slot = self.disk_slot[page]
        parts = (KEYS, VALUES) if g.parts == 2 else (VALUES,)
        spans = {p: self._spans(p, hh, tok, slot) for p in (parts if part == parts[0] else (part,))}
        if part == parts[0]:   # every part's blocks at once: K and V share blocks or are read side by side
            each = [self._keys(page, *spans[p][:2]) for p in parts]
            keys, first = np.unique(np.concatenate([k.reshape(-1) for k in each]), return_index=True)
            block_slots = np.concatenate([np.repeat(slot, k.shape[1]) for k in each])[first]
            self.reader.request(self.layer, keys, block_slots)
            self.disk_blocks = (np.concatenate([self.disk_blocks[0], keys]),
                                np.concatenate([self.disk_blocks[1], block_slots]))
        offset, size, bits = spans[part]
        rows = out.view(Hkv, -1, C * D)
        slots = dst[h, j]
        for b in ([None] if bits is None else np.unique(bits).tolist()):
            pick = np.arange(len(tok)) if b is None else np.flatnonzero(bits == b)
            n, sz = len(pick), int(size[pick[0]])
            keys = self._keys(page[pick], offset[pick], size[pick])
            data = self.reader.get(self.layer, keys.reshape(-1), np.repeat(slot[pick], keys.shape[1]))
            data = data.reshape(n, -1)
            inside = offset[pick] % BLOCK
            if BLOCK % sz == 0:   # a run inside one block, at a multiple of its size (D a power of two)
                data = data.reshape(n, -1, sz)[np.arange(n), inside // sz]
            elif sz % BLOCK == 0:   # whole blocks
                data = data[:, :sz]
            else:                   # any other size: byte by byte out of the blocks it spans
                data = np.take_along_axis(data, inside[:, None] + np.arange(sz), 1)
            at = torch.from_numpy(pick).to(out.device)
            runs = torch.from_numpy(np.ascontiguousarray(data)).to(out.device)
            if b is None:
                rows[h[at], slots[at]] = runs.view(g.dtype).view(n, C * D)
                continue
            scales = disk.codec.units_meta(disk.meta[self.layer], part, torch.from_numpy(hh[pick]),  # host meta
                                           torch.from_numpy(tok[pick] % P // C), lead=(torch.from_numpy(slot[pick]),))
            codes = disk.codec.decode_units(runs, scales.to(out.device), part, b, out.dtype)
            rows[h[at], slots[at]] = codes.view(n, C * D)
