"""The tiered KV store: pages on the GPU, in pinned CPU memory and on disk, each tier with a byte budget.

    store.write(layer, start, k, v)    append tokens start.. of one layer (k, v: (T, Hkv, D) on the device;
                                       k is ignored by a store of values only, ``geometry.parts == 1``)
    store.runs(layer, n_tokens)        where the layer's first n tokens live, as runs of consecutive pages
    store.open_page(layer)             the page being filled, on the device
    store.truncate(n)                  drop every token from n on (pages past it are released everywhere)
    store.stats()                      tokens and bytes per tier, bytes moved

Placement: a page is sealed when full and goes to the fastest tier with room. When a tier is full its
oldest page moves one tier down (GPU -> CPU -> disk), so the newest pages, the ones sparse policies read most,
stay nearest the GPU, and a page is copied down at most twice and written to disk once in its life.
Each layer has an equal share of every tier's budget (all layers hold the same tokens), so a layer's pages
sit in consecutive slots of that layer's arenas and files: a run of them moves in one copy or one read.
When neither tier below has room the store refuses with ContextOverflowError: a context past every tier.

A store made with ``gpu_values=True`` (for a policy whose decode reads only V from the store, `Footprint.gpu_values`)
spends its GPU budget on copies of pages' values, twice the tokens a page of K and V would hold.
Every sealed page then has its *home*, K and V, in the CPU tier or on disk, and the GPU tier caches the values
of the newest pages: sealing writes the page home and its V to the GPU while there is room, and a full GPU tier
drops its oldest copy (nothing to move: the home has it). `locate` says where a page's keys or values are read.

A store made with a ``disk_codec`` (`disk_codec.QuantizedPages`) keeps its disk pages quantized: cold KV, the
oldest, at int8 or int4, as ``disk_bits(layer, page)`` says when the page goes down (a policy sets it from
what it measured of the page; None: the codec's default). Reads from disk return the dequantized page.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ContextOverflowError
from .disk import DiskTier
from .pages import KEYS, VALUES, PageGeometry, PagePool

GPU, CPU, DISK = "gpu", "cpu", "disk"


@dataclass
class Budgets:
    """Bytes of KV each tier may hold (the page being filled in each layer is not counted)."""

    gpu_bytes: int
    cpu_bytes: int
    disk_dir: Path | None = None
    disk_bytes: int | None = None
    """Cap on the disk tier (None: as much as the file system holds)."""


@dataclass
class PageEntry:
    """Where one sealed page lives; -1 where it is absent. Disk copies are permanent once written."""

    gpu: int = -1
    cpu: int = -1
    disk: int = -1

    @property
    def tier(self) -> str:
        return GPU if self.gpu >= 0 else CPU if self.cpu >= 0 else DISK


@dataclass
class Run:
    """``n`` consecutive pages of one layer, from page ``first``, in consecutive slots of one tier."""

    tier: str
    first: int
    n: int
    slot: int


@dataclass
class MoveCounters:
    h2d: int = 0
    d2h: int = 0
    disk_read: int = 0
    disk_write: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _remove_scratch(disk: DiskTier, path: Path) -> None:
    disk.close()
    shutil.rmtree(path, ignore_errors=True)


class KVStore:
    def __init__(self, geometry: PageGeometry, budgets: Budgets, device: torch.device, gpu_values: bool = False,
                 disk_codec=None):
        self.geometry = geometry
        self.budgets = budgets
        self.device = device
        self.gpu_values = gpu_values and geometry.parts == 2
        """The GPU tier holds copies of pages' values (see the module's docstring)."""
        on_gpu = device.type == "cuda"
        per_layer = lambda total, g: max(0, total // g.page_bytes // g.n_layers)  # noqa: E731
        gpu_geometry = replace(geometry, parts=1) if self.gpu_values else geometry
        self.gpu = PagePool(gpu_geometry, per_layer(budgets.gpu_bytes, gpu_geometry), device)
        self.cpu = PagePool(geometry, per_layer(budgets.cpu_bytes, geometry), torch.device("cpu"), pin=on_gpu)
        self.disk = None
        if budgets.disk_dir is not None:
            slot_bytes = disk_codec.slot_bytes if disk_codec is not None else geometry.page_bytes
            max_pages = None if budgets.disk_bytes is None else budgets.disk_bytes // slot_bytes
            from .disk import check_writable

            check_writable(Path(budgets.disk_dir))
            Path(budgets.disk_dir).mkdir(parents=True, exist_ok=True)
            # Each store has its own scratch directory, removed with the store.
            scratch = Path(tempfile.mkdtemp(prefix="kv-", dir=budgets.disk_dir))
            self.disk = DiskTier(geometry, scratch, max_pages, codec=disk_codec)
            weakref.finalize(self, _remove_scratch, self.disk, scratch)
        L = geometry.n_layers
        self.open = torch.zeros((L, *geometry.page_shape), dtype=geometry.dtype, device=device)
        self.pages: list[list[PageEntry]] = [[] for _ in range(L)]
        self.gpu_fifo: list[deque[int]] = [deque() for _ in range(L)]  # page indices, oldest first
        self.cpu_fifo: list[deque[int]] = [deque() for _ in range(L)]
        self.tokens = [0] * L
        self.moved = MoveCounters()
        self.disk_bits = None
        """(layer, page index) -> bits (8 or 4) for a page going to a quantized disk tier, or None for the default."""

    # -- writing -----------------------------------------------------------------------------------------
    def write(self, layer: int, start: int, k: torch.Tensor | None, v: torch.Tensor) -> None:
        """Store tokens ``start .. start+T-1`` of ``layer``; k, v are (T, Hkv, D) on the device. A store of
        values only (``geometry.parts == 1``) ignores k, which may be None."""
        if start != self.tokens[layer]:
            self.truncate_layer(layer, start)  # a forward that failed half-way left a tail: drop it
        g = self.geometry
        P, keys, values = g.page_tokens, g.parts == 2, g.part_index(VALUES)
        T, pos, i = v.shape[0], start, 0
        while i < T:
            page, off = divmod(pos, P)
            n = min(P - off, T - i)
            if keys:
                self.open[layer, KEYS, :, off:off + n] = k[i:i + n].transpose(0, 1)
            self.open[layer, values, :, off:off + n] = v[i:i + n].transpose(0, 1)
            if off + n == P:
                self._seal(layer)  # may raise (disk full): tokens[layer] still counts only what is stored
            pos, i = pos + n, i + n
            self.tokens[layer] = pos

    def _seal(self, layer: int) -> None:
        data = self.open[layer]
        entry = PageEntry()
        index = len(self.pages[layer])
        if self.gpu_values:
            self._place_below(layer, index, entry, data)   # may raise (disk full), before anything is committed
            slot = self._alloc(self.gpu, self.gpu_fifo, layer, self._drop_gpu_values)
            if slot is not None:
                copy = self.gpu.page(layer, slot)[self.gpu.geometry.part_index(VALUES)]
                copy.copy_(data[self.geometry.part_index(VALUES)])
                entry.gpu = slot
                self.gpu_fifo[layer].append(index)
            self.pages[layer].append(entry)
            return
        slot = self._alloc(self.gpu, self.gpu_fifo, layer, self._demote_gpu)
        if slot is not None:
            self.gpu.page(layer, slot).copy_(data)
            entry.gpu = slot
            self.gpu_fifo[layer].append(index)
        else:
            self._place_below(layer, index, entry, data)
        self.pages[layer].append(entry)

    def _place_below(self, layer: int, index: int, entry: PageEntry, data: torch.Tensor) -> None:
        """Page ``index`` (``data`` on the device) to the CPU tier, or to disk when the CPU tier is full."""
        slot = self._alloc(self.cpu, self.cpu_fifo, layer, self._demote_cpu)
        if slot is not None:
            self.cpu.page(layer, slot).copy_(data, non_blocking=self.cpu.pin)  # ordered: see _host_ready
            self.moved.d2h += self.geometry.page_bytes if self.device.type == "cuda" else 0
            entry.cpu = slot
            self.cpu_fifo[layer].append(index)
        else:
            entry.disk = self._write_disk(layer, index, data)

    def _drop_gpu_values(self, layer: int, index: int) -> None:
        """A ``gpu_values`` store's GPU tier is full: the oldest copy of values goes (its home has them)."""
        entry = self.pages[layer][index]
        self.gpu.release(layer, entry.gpu)
        entry.gpu = -1

    def _alloc(self, pool: PagePool, fifo: deque, layer: int, demote) -> int | None:
        slot = pool.alloc(layer)
        if slot is None and fifo[layer]:
            demote(layer, fifo[layer][0])  # may raise (disk full) and then changes nothing
            fifo[layer].popleft()
            slot = pool.alloc(layer)
        return slot

    def _demote_gpu(self, layer: int, index: int) -> None:
        entry = self.pages[layer][index]
        src = self.gpu.page(layer, entry.gpu)
        slot = self._alloc(self.cpu, self.cpu_fifo, layer, self._demote_cpu)
        if slot is not None:
            self.cpu.page(layer, slot).copy_(src, non_blocking=self.cpu.pin)
            entry.cpu = slot
            self.cpu_fifo[layer].append(index)
            self.moved.d2h += self.geometry.page_bytes if self.device.type == "cuda" else 0
        elif entry.disk < 0:
            entry.disk = self._write_disk(layer, index, src)
        self.gpu.release(layer, entry.gpu)
        entry.gpu = -1

    def _host_ready(self) -> None:
        """Device-to-pinned copies are asynchronous (on the compute stream, so the pipeline's copy stream,
        which waits on it, sees them in order); the host must wait before it reads a pinned page itself."""
        if self.cpu.pin:
            torch.cuda.current_stream(self.device).synchronize()

    def _demote_cpu(self, layer: int, index: int) -> None:
        entry = self.pages[layer][index]
        if entry.disk < 0:
            self._host_ready()
            entry.disk = self._write_disk(layer, index, self.cpu.page(layer, entry.cpu))
        self.cpu.release(layer, entry.cpu)
        entry.cpu = -1

    def _write_disk(self, layer: int, index: int, page: torch.Tensor) -> int:
        """Send a page (on any device) to disk; returns its slot."""
        if self.disk is None:
            raise ContextOverflowError(
                f"the KV cache outgrew the GPU and CPU budgets ({self.budgets.gpu_bytes / 2**30:.2f} GB + "
                f"{self.budgets.cpu_bytes / 2**30:.2f} GB) at {self.tokens[layer]:,} tokens; "
                f"give a --disk DIR, raise --cpu-mem, or lower --ctx")
        bits = None
        if self.disk.codec is None:
            page = page.cpu()
        else:   # quantized on the device: a page's worth of work, off the host
            bits = self.disk_bits(layer, index) if self.disk_bits is not None else None
            page = page.to(self.device, non_blocking=True)
        slot = self.disk.write(layer, page, bits)
        self.moved.disk_write += self.disk.page_size(layer, slot)
        return slot

    # -- reading -----------------------------------------------------------------------------------------
    def home(self, entry: PageEntry) -> str:
        """The tier that holds a sealed page's K and V (for a ``gpu_values`` store, never the GPU)."""
        if self.gpu_values:
            return CPU if entry.cpu >= 0 else DISK
        return entry.tier

    def locate(self, entry: PageEntry, part: int) -> tuple[str, int]:
        """(tier, slot) to read ``part`` (KEYS or VALUES) of a sealed page from: the GPU's copy of its values when
        there is one, else its home."""
        if entry.gpu >= 0 and (part == VALUES or not self.gpu_values):
            return GPU, entry.gpu
        tier = self.home(entry)
        return tier, getattr(entry, tier)

    def sealed_pages(self, layer: int, n_tokens: int) -> int:
        """Pages of ``layer`` wholly inside the first ``n_tokens`` tokens."""
        return min(n_tokens // self.geometry.page_tokens, len(self.pages[layer]))

    def runs(self, layer: int, n_tokens: int, max_pages: int | None = None) -> list[Run]:
        """The sealed pages among the first ``n_tokens`` tokens, as runs in one tier with consecutive slots."""
        runs: list[Run] = []
        for index in range(self.sealed_pages(layer, n_tokens)):
            entry = self.pages[layer][index]
            tier = self.home(entry)
            slot = getattr(entry, tier)
            last = runs[-1] if runs else None
            if (last is not None and last.tier == tier and last.slot + last.n == slot
                    and (max_pages is None or last.n < max_pages)
                    and (tier == DISK or self._pool(tier).run(layer, last.slot, last.n + 1) is not None)):
                last.n += 1
            else:
                runs.append(Run(tier, index, 1, slot))
        return runs

    def _pool(self, tier: str) -> PagePool:
        return self.gpu if tier == GPU else self.cpu

    def open_page(self, layer: int) -> torch.Tensor:
        """The page being filled, (parts, Hkv, P, D) on the device; its first ``tokens % P`` rows are valid."""
        return self.open[layer]

    # -- truncation --------------------------------------------------------------------------------------
    def truncate(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` tokens of every layer."""
        for layer in range(self.geometry.n_layers):
            self.truncate_layer(layer, n_tokens)

    def truncate_layer(self, layer: int, n_tokens: int) -> None:
        if n_tokens >= self.tokens[layer]:
            return
        P = self.geometry.page_tokens
        keep, partial = divmod(n_tokens, P)
        pages = self.pages[layer]
        if partial and keep < len(pages):
            self.open[layer].copy_(self.read_page(layer, keep))  # the cut page becomes the open page again
        for index in range(len(pages) - 1, keep - 1, -1):
            entry = pages.pop()
            if entry.gpu >= 0:
                self.gpu.release(layer, entry.gpu)
                self.gpu_fifo[layer].remove(index)
            if entry.cpu >= 0:
                self.cpu.release(layer, entry.cpu)
                self.cpu_fifo[layer].remove(index)
            if entry.disk >= 0:
                self.disk.release(layer, entry.disk)
        self.tokens[layer] = n_tokens

    def read_page(self, layer: int, index: int) -> torch.Tensor:
        """One sealed page on the device, from wherever it lives (a slow path: truncation, sessions, the
        chunks a sparse policy selects from disk). Counted in ``moved``."""
        entry = self.pages[layer][index]
        if entry.gpu >= 0 and not self.gpu_values:
            return self.gpu.page(layer, entry.gpu)
        if entry.cpu >= 0:
            self._host_ready()
            page = self.cpu.page(layer, entry.cpu)
        else:
            page = torch.empty(self.geometry.page_shape, dtype=self.geometry.dtype)
            self.disk.read_into(layer, entry.disk, page, verify=True)
            self.moved.disk_read += self.disk.page_size(layer, entry.disk)
        if self.device.type == "cuda":
            self.moved.h2d += self.geometry.page_bytes
        return page.to(self.device)

    # -- numbers -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Tokens and bytes per tier. Tokens count each page once, at its home; a ``gpu_values`` store also
        reports ``gpu_value_tokens``, those whose values its GPU tier holds copies of."""
        P = self.geometry.page_tokens
        count = {GPU: 0, CPU: 0, DISK: 0}
        cached = 0
        for layer_pages in self.pages:
            for e in layer_pages:
                count[self.home(e)] += 1
                cached += e.gpu >= 0
        L = self.geometry.n_layers
        open_tokens = self.tokens[0] % P if self.tokens else 0
        out = {
            "gpu_tokens": count[GPU] * P // L + open_tokens, "cpu_tokens": count[CPU] * P // L,
            "disk_tokens": count[DISK] * P // L,
            "gpu_bytes": self.gpu.used_bytes + self.open.numel() * self.open.element_size(),
            "cpu_bytes": self.cpu.used_bytes, "disk_bytes": self.disk.used_bytes if self.disk else 0,
            "gpu_budget": self.budgets.gpu_bytes, "cpu_budget": self.budgets.cpu_bytes,
            "moved_bytes": self.moved.as_dict(),
        }
        if self.gpu_values:
            out["gpu_value_tokens"] = cached * P // L + open_tokens
        return out
