"""The selected chunks' bytes on disk, read block by block by a thread pool into a bounded host cache, prefetched.

A decode step's chunks that live on disk are the only ones the host must read (`offload.chunks.StoreChunks`
reads every other tier with one gather). Disk is read only for what is used: a 16-token unit of one KV head is
one contiguous run of ``16 * D`` elements of its page (4 KB for D = 128 in bf16), so the reader fetches the
4096-byte blocks that hold the selected runs, never whole pages. `DiskBlocks` keeps the disk off the decode
thread's critical path:

    request(layer, blocks)   submit the (page, block) keys not cached nor in flight to ``io_threads`` reader
                             threads, consecutive blocks of a page as one read (`DiskTier.read_blocks`:
                             os.preadv, O_DIRECT where the file system allows, each block checked by its crc32)
    get(layer, page, block)  the block's bytes on the host, waiting only for a read still in flight
    prefetch(layer, blocks)  `request` for a layer before it runs: layer l issues layer l+1's blocks of its
                             previous step (the last layer, layer 0's of the next step), read while l computes
    forget_from(layer, p)    drop pages p.. (truncation: their slots may be rewritten with other tokens)

Cached blocks stay until ``cache_bytes`` is exceeded (least recently used first); a block read once is not read
again while it stays. Blocks are immutable while cached: a sealed page never changes, and truncation, the one
way a page index gets new tokens, drops the pages it cuts (`forget_from`) after waiting for reads in flight.

``io_threads=0`` reads in the calling thread, with no cache: the synchronous path the threaded one must equal.
Stats: ``wait_s`` (decode thread blocked on disk), ``requests`` / ``hits`` (blocks asked for by a step / found
cached or already in flight), ``bytes_read`` (bytes actually read from disk).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ...chunks import StoreChunks
from ...pages import DISK_ALIGN
from ...store import KVStore

BLOCK = DISK_ALIGN
"""Bytes per block: the unit of disk reads and of the host cache."""


class DiskBlocks:
    """Host-side cache and reader threads for the store's disk pages, in blocks (one per cache, all layers)."""

    def __init__(self, store: KVStore, io_threads: int = 4, cache_bytes: int = 64 << 20):
        self.store = store
        self.io_threads = io_threads
        self.capacity = max(1, cache_bytes // BLOCK) if io_threads else 0   # blocks kept
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="leoam-io") if io_threads else None
        # (layer, page, block) -> (the read of a run of blocks, this block's place in it), in LRU order
        self.blocks: OrderedDict[tuple[int, int, int], tuple[Future, int]] = OrderedDict()
        self.wait_s = 0.0
        self.requests = self.hits = self.bytes_read = 0

    def _read(self, layer: int, slot: int, first: int, n: int) -> torch.Tensor:
        """Blocks first.. of disk slot ``slot`` as (n, BLOCK) uint8; on a reader thread (or the caller's)."""
        return self.store.disk.read_blocks(layer, slot, first, n).view(n, BLOCK)

    def _slot(self, layer: int, page: int) -> int:
        pages = self.store.pages[layer]
        return pages[page].disk if page < len(pages) else -1

    def _count(self, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.store.moved.disk_read += nbytes

    def _submit(self, layer: int, keys: list[tuple[int, int]]) -> None:
        """Start reading the (page, block) keys not cached or in flight, a run of consecutive blocks at a time."""
        todo = []
        for page, block in keys:
            key = (layer, page, block)
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                todo.append((page, block))
        todo.sort()
        i = 0
        while i < len(todo):
            page, first = todo[i]
            n = 1
            while i + n < len(todo) and todo[i + n] == (page, first + n):
                n += 1
            i += n
            slot = self._slot(layer, page)   # read on this thread: truncation changes the entries
            if slot < 0:                     # not (or no longer) on disk: a stale prefetch
                continue
            future = self.pool.submit(self._read, layer, slot, first, n)
            self._count(n * BLOCK)
            for j in range(n):
                self.blocks[(layer, page, first + j)] = (future, j)
        while len(self.blocks) > self.capacity:    # the oldest go (a read in flight finishes into nothing)
            self.blocks.popitem(last=False)

    def request(self, layer: int, keys: list[tuple[int, int]]) -> None:
        """Start reading the (page, block) keys of ``layer`` a step needs (counted as requests)."""
        if self.pool is None:
            return
        self.requests += len(keys)
        self.hits += sum((layer, p, b) in self.blocks for p, b in keys)
        self._submit(layer, keys[-self.capacity:])   # never more than the cache holds

    def prefetch(self, layer: int, keys: list[tuple[int, int]]) -> None:
        """Start reading blocks a later step will likely ask for (not counted as requests)."""
        if self.pool is not None:
            self._submit(layer, keys[-self.capacity:])

    def get(self, layer: int, page: int, block: int) -> torch.Tensor:
        """Block ``block`` of page ``page`` of ``layer``, (BLOCK,) uint8 on the host; blocks only for a read in
        flight."""
        t = time.perf_counter()
        if self.pool is None:
            data = self._read(layer, self._slot(layer, page), block, 1)[0]
            self._count(BLOCK)
            self.requests += 1
        else:
            entry = self.blocks.get((layer, page, block))
            if entry is None:   # evicted since `request` (a step larger than the cache)
                self._submit(layer, [(page, block)])
                entry = self.blocks[(layer, page, block)]
            future, j = entry
            data = future.result()[j]   # re-raises a read error (a bad checksum) here, on the decode thread
        self.wait_s += time.perf_counter() - t
        return data

    def forget_from(self, layer: int, page: int) -> None:
        """Drop pages ``page``.. of ``layer`` (after their reads finish: the store is about to reuse their slots)."""
        for key in [key for key in self.blocks if key[0] == layer and key[1] >= page]:
            self.blocks.pop(key)[0].exception()   # waits; a failed read is dropped with its blocks

    def drain(self) -> None:
        """Wait for every read in flight."""
        for future, _ in self.blocks.values():
            future.exception()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class LayerChunks(StoreChunks):
    """`StoreChunks` whose disk entries come through `DiskBlocks` (threaded, cached, prefetched, only the blocks
    that hold them) instead of one synchronous `KVStore.read_page` per page and part. ``disk_blocks`` lists the
    (page, block) keys this layer's last step read, keys and values (`begin_step` clears it): the next step's
    prefetch for it."""

    def __init__(self, store: KVStore, layer: int, chunk_tokens: int, reader: DiskBlocks):
        super().__init__(store, layer, chunk_tokens)
        self.reader = reader
        self.disk_blocks: list[tuple[int, int]] = []

    def begin_step(self) -> None:
        self.disk_blocks = []

    def _from_disk(self, part: int, chunks: torch.Tensor, dst: torch.Tensor, out: torch.Tensor) -> None:
        """The entries on disk (``dst`` >= 0): the blocks holding their bytes requested at once (read in parallel),
        then each entry's bytes cut out of its blocks on the host, decoded where the pages are quantized, and
        copied to its slot."""
        h, j = (dst >= 0).nonzero(as_tuple=True)                 # the one host sync, for layers with disk pages
        if h.numel() == 0:
            return
        g, disk = self.store.geometry, self.store.disk
        C, P, D, Hkv = self.C, g.page_tokens, g.head_dim, g.n_kv_heads
        tok, hh = (chunks[h, j] * C).cpu(), h.cpu()
        pages = (tok // P).tolist()
        codec, bits = disk.codec, None
        if codec is None:   # a chunk of one head and part is one run of its page
            size = C * D * g.dtype.itemsize
            starts = (((g.part_index(part) * Hkv + hh) * P + tok % P) * size // C).tolist()
            spans = [(a, size) for a in starts]
        else:               # its codes in the page's encoding, at the page's bits; their scales are on the host
            on_disk = [self.store.pages[self.layer][p].disk for p in pages]
            bits = [disk.page_bits[(self.layer, s)] for s in on_disk]
            units = (tok % P // C).tolist()
            spans = [codec.span(part, h_, u, b) for h_, u, b in zip(hh.tolist(), units, bits)]
            meta = [codec.unit_meta(disk.meta[(self.layer, s)], part, h_, u)
                    for s, h_, u in zip(on_disk, hh.tolist(), units)]
        keys = sorted({(p, b) for p, (a, n) in zip(pages, spans) for b in range(a // BLOCK, (a + n - 1) // BLOCK + 1)})
        self.reader.request(self.layer, keys)
        self.disk_blocks += keys
        runs = [self._cut(p, a, n) for p, (a, n) in zip(pages, spans)]
        rows = out.view(Hkv, -1, C * D)
        slots = dst[h, j]
        if codec is None:
            rows[h, slots] = torch.stack(runs).view(g.dtype).view(-1, C * D).to(out.device)
            return
        for b in (8, 4):   # a page's bits decide its runs' size: decoded in one batch per bits
            pick = [i for i, bi in enumerate(bits) if bi == b]
            if pick:
                codes = torch.stack([runs[i] for i in pick]).to(out.device)
                scales = torch.stack([meta[i] for i in pick]).to(out.device)
                at = torch.tensor(pick, device=out.device)
                rows[h[at], slots[at]] = codec.decode_units(codes, scales, part, b, out.dtype).view(-1, C * D)

    def _cut(self, page: int, start: int, size: int) -> torch.Tensor:
        """``size`` bytes from byte ``start`` of a disk page, out of its cached blocks, on the host."""
        first, last = start // BLOCK, (start + size - 1) // BLOCK
        blocks = [self.reader.get(self.layer, page, b) for b in range(first, last + 1)]
        data = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return data[start - first * BLOCK:start - first * BLOCK + size]
