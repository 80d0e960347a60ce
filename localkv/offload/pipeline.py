"""The async I/O pipeline: the pages a forward will read move towards the device ahead of the compute.

At the start of a forward, ``begin(n_tokens)`` lists every block (up to ``block_pages`` consecutive pages)
of every layer that is not already on the device, in the order the layers will read them, and starts
filling a ring of ``ring_blocks`` device staging buffers:

    disk  --reader threads, os.preadv (O_DIRECT)-->  pinned staging  --copy stream-->  device ring slot
    pinned CPU tier  ----------------------------------copy stream-->  device ring slot

Each ring slot carries two CUDA events: ``ready`` (recorded on the copy stream after its copy; the compute
stream waits on it before the attention that reads the slot) and ``free`` (recorded on the compute stream
once that attention is enqueued; the copy stream waits on it before overwriting the slot). The ring runs
ahead across layer boundaries, so while layer l computes, layer l+1's pages are already in flight.
On a machine without a GPU the same schedule runs with host memory as the device: CPU-tier pages are read
in place, disk pages are read by the threads into ring slots.

Disk reads: plain threads calling ``os.preadv`` (O_DIRECT) into preallocated pinned buffers, kept because
they are faster than ``aiofiles`` on the GPU machine's disk, as ``scripts/bench_store.py`` measures both in one
run (H100 machine, virtio disk, 2 GiB file, 1 MiB requests, 8 in flight): preadv threads 2.03 GB/s, aiofiles
1.25 GB/s (1.58-1.94 against 0.98-1.31 in other runs of the same script). aiofiles runs the
same blocking read in a thread pool behind an asyncio loop, through the page cache, and hands back a bytes
object that must then be copied into the pinned buffer.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .pages import pinned_empty
from .store import CPU, DISK, GPU, KVStore, Run


@dataclass
class _Block:
    layer: int
    run: Run
    slot: int = -1
    future: Future | None = None
    ready: object = None  # torch.cuda.Event


class BlockReader:
    """Streams the sealed pages of each layer to the device, block by block, ahead of use."""

    def __init__(self, store: KVStore, block_pages: int = 64, ring_blocks: int = 4, io_threads: int = 4):
        self.store = store
        self.block_pages = block_pages
        self.ring_blocks = ring_blocks
        self.cuda = store.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(store.device) if self.cuda else None
        self.threads = ThreadPoolExecutor(io_threads, thread_name_prefix="localkv-io")
        g = store.geometry
        shape = (ring_blocks, block_pages, *g.page_shape)
        self._ring_shape = shape
        self.ring: torch.Tensor | None = None      # device staging
        self.staging: torch.Tensor | None = None   # pinned host staging for disk reads (GPU only)
        self.free_events = [None] * ring_blocks      # compute done with ring[slot]
        self.staging_events = [None] * ring_blocks   # copy out of staging[slot] done
        self.free_slots: deque[int] = deque(range(ring_blocks))
        self.pending: deque[_Block] = deque()
        self.inflight: deque[_Block] = deque()
        self.n_tokens = 0

    def _ensure_buffers(self) -> None:
        if self.ring is None:
            g = self.store.geometry
            self.ring = torch.empty(self._ring_shape, dtype=g.dtype, device=self.store.device)
            if self.cuda:
                self.staging = pinned_empty(self._ring_shape, g.dtype, "the prefill's staging ring")

    def _on_device(self, tier: str) -> bool:
        return tier == GPU or (tier == CPU and not self.cuda)

    def begin(self, n_tokens: int) -> None:
        """Schedule the reads of one forward over the first ``n_tokens`` tokens of every layer."""
        self.drain()
        self.n_tokens = n_tokens
        if self.cuda:  # pages sealed into pinned memory by the compute stream must land before we read them
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.store.device))
        for layer in range(self.store.geometry.n_layers):
            for run in self.store.runs(layer, n_tokens, self.block_pages):
                if not self._on_device(run.tier):
                    self.pending.append(_Block(layer, run))
        if self.pending:
            self._ensure_buffers()
        self._pump()

    def _pump(self) -> None:
        while self.pending and self.free_slots:
            block = self.pending.popleft()
            block.slot = self.free_slots.popleft()
            if block.run.tier == DISK:
                block.future = self.threads.submit(self._load_from_disk, block)
            else:
                self._copy_to_ring(block, self.store.cpu.run(block.layer, block.run.slot, block.run.n))
            self.inflight.append(block)

    @torch.inference_mode()  # the buffers were made under the forward's inference mode; this is another thread
    def _load_from_disk(self, block: _Block) -> None:
        disk, run = self.store.disk, block.run
        host = self.staging[block.slot] if self.cuda else self.ring[block.slot]
        if self.cuda and self.staging_events[block.slot] is not None:
            self.staging_events[block.slot].synchronize()  # the last copy out of this buffer has finished
        for i in range(run.n):
            disk.read_into(block.layer, run.slot + i, host[i])
        self.store.moved.disk_read += int(disk.sizes[block.layer][run.slot:run.slot + run.n].sum())
        if self.cuda:
            self._copy_to_ring(block, host[:run.n])

    def _copy_to_ring(self, block: _Block, src: torch.Tensor) -> None:
        n = block.run.n
        if not self.cuda:  # host memory is the device: nothing to copy for the CPU tier
            return
        with torch.cuda.stream(self.copy_stream):
            if self.free_events[block.slot] is not None:
                self.copy_stream.wait_event(self.free_events[block.slot])
            self.ring[block.slot, :n].copy_(src, non_blocking=True)
            block.ready = torch.cuda.Event()
            block.ready.record(self.copy_stream)
            if block.run.tier == DISK:
                self.staging_events[block.slot] = block.ready
        self.store.moved.h2d += n * self.store.geometry.page_bytes

    def blocks(self, layer: int):
        """Yield (first_page, kv (n, parts, Hkv, P, D) on the device) for the layer's sealed pages, in order."""
        for run in self.store.runs(layer, self.n_tokens, self.block_pages):
            if run.tier == GPU:
                yield run.first, self.store.gpu.run(layer, run.slot, run.n)
                continue
            if run.tier == CPU and not self.cuda:
                yield run.first, self.store.cpu.run(layer, run.slot, run.n)
                continue
            block = self.inflight.popleft()
            assert block.layer == layer and block.run.first == run.first, "pipeline out of step with the store"
            if block.future is not None:
                block.future.result()  # re-raises a read error here, on the compute thread
            if self.cuda:
                torch.cuda.current_stream().wait_event(block.ready)
            yield run.first, self.ring[block.slot, :run.n]
            if self.cuda:  # the attention over this slot is enqueued: the slot may be refilled after it
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream())
                self.free_events[block.slot] = ev
            self.free_slots.append(block.slot)
            self._pump()

    def drain(self) -> None:
        """Finish whatever is in flight (before the store changes under it, or at the end)."""
        for block in self.inflight:
            if block.future is not None:
                block.future.result()
            self.free_slots.append(block.slot)
        self.inflight.clear()
        self.pending.clear()
