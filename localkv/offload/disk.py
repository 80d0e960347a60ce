"""The disk tier: one file per layer under ``--disk DIR``, fixed page slots aligned for O_DIRECT.

Slot ``s`` of layer ``l`` lives at byte ``s * slot_bytes`` of ``layer_{l:03d}.kv``. A page is written once
(KV is append-only), padded to whole 4096-byte blocks, with a 64-bit checksum of each block kept in memory
(`block_sums`), so that a whole page read back (`read_into`) and a policy reading a few chunks of many pages
(`read_blocks`, `read_runs`) all check what they read; reads go
through O_DIRECT where the file system supports it (the page cache would otherwise hide the disk's real speed and
double the memory a long context takes), and fall back to buffered I/O where it does not (tmpfs refuses O_DIRECT).
I/O is plain ``os.pwrite``/``os.preadv`` into caller-owned buffers; buffers that are not 4096-aligned
go through an aligned bounce buffer.

With a ``codec`` (`disk_codec.QuantizedPages`) pages are stored as int8 or int4 codes, each at the bits its
writer asked for (``bits``), their scales in host memory (``meta``), and `read_into` decodes them;
`read_blocks` and `read_runs` return codes, which the caller decodes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .pages import DISK_ALIGN, PageGeometry


class DiskFullError(UserError):
    """The disk tier's file system ran out of space (or quota)."""


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, pinned or not)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _aligned_buffer(nbytes: int) -> memoryview:
    return memoryview(mmap.mmap(-1, -(-nbytes // DISK_ALIGN) * DISK_ALIGN))  # anonymous maps are page-aligned


_WORDS = DISK_ALIGN // 8
_WEIGHTS = np.random.default_rng(0x6C6B76).integers(0, 1 << 63, _WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def block_sums(data: np.ndarray) -> np.ndarray:
    """The checksum of each 4096-byte block of ``data`` (uint8, a whole number of blocks): ``Σ_i w_i x_i mod 2^64``
    over its 512 little-endian 64-bit words ``x_i``, with fixed odd weights ``w_i``. An odd weight is invertible
    mod 2^64, so any change confined to one word changes the sum; unrelated changes cancel with probability
    2^-64. Unlike crc32 it is a few vector operations over any number of blocks (numpy releases the GIL)."""
    words = data.view(np.uint64).reshape(-1, _WORDS)
    return (words * _WEIGHTS).sum(1, dtype=np.uint64)


def run_items(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Runs ``firsts[i] .. firsts[i] + counts[i] - 1`` laid end to end: every item of every run, in order."""
    starts = np.cumsum(counts) - counts                  # where each run begins in the output
    return np.repeat(firsts - starts, counts) + np.arange(int(counts.sum()))


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with room for at least ``n`` rows (doubling), new rows zero."""
    if n <= len(a):
        return a
    out = np.zeros((max(n, 2 * len(a), 16), *a.shape[1:]), dtype=a.dtype)
    out[:len(a)] = a
    return out


def check_writable(directory: Path, what: str = "--disk") -> None:
    """Fail early, before any work, when ``directory`` cannot hold KV pages. Creates nothing: a directory not yet
    there is checked through its nearest existing parent, so a run or plan that stops later leaves no trace."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
        probe = existing / f".localkv-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * DISK_ALIGN)
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {directory} is not writable: {e.strerror or e}") from None


class DiskTier:
    """Page slots in per-layer files. ``max_pages`` caps the pages over all layers (None: the disk's room)."""

    def __init__(self, geometry: PageGeometry, directory: Path, max_pages: int | None = None,
                 o_direct: bool = True, codec=None):
        self.geometry = geometry
        self.codec = codec
        self.slot_bytes = codec.slot_bytes if codec is not None else geometry.slot_bytes
        self.slot_blocks = self.slot_bytes // DISK_ALIGN
        L = geometry.n_layers
        # Per layer, indexed by slot: bytes its page takes (0: free), the bits of its encoding (codec only), the
        # checksum of each block, and its scales and zeros (codec only), grown as slots are taken.
        self.sizes = [np.zeros(0, np.int64) for _ in range(L)]
        self.bits = [np.zeros(0, np.int8) for _ in range(L)]
        self.sums = [np.zeros((0, self.slot_blocks), np.uint64) for _ in range(L)]
        self.meta: list[torch.Tensor | None] = [None] * L
        self.directory = Path(directory)
        check_writable(self.directory)
        self.max_pages = max_pages
        self.want_direct = o_direct and hasattr(os, "O_DIRECT")
        self.direct: bool | None = None  # decided at the first open
        self.fds: dict[int, int] = {}
        self.next_slot = [0] * geometry.n_layers
        self.free: list[list[int]] = [[] for _ in range(geometry.n_layers)]
        self.used = 0
        self.used_bytes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._local = threading.local()  # one bounce buffer per reader thread

    def path(self, layer: int) -> Path:
        return self.directory / f"layer_{layer:03d}.kv"

    def _fd(self, layer: int) -> int:
        fd = self.fds.get(layer)
        if fd is None:
            flags = os.O_RDWR | os.O_CREAT
            if self.want_direct and self.direct is not False:
                try:
                    fd = os.open(self.path(layer), flags | os.O_DIRECT, 0o644)
                    self.direct = True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # tmpfs and some others: no O_DIRECT
            if fd is None:
                fd = os.open(self.path(layer), flags, 0o644)
                self.direct = bool(self.direct)
            self.fds[layer] = fd
        return fd

    def _io_view(self, t: torch.Tensor) -> tuple[memoryview, bool]:
        """The tensor's bytes, or a bounce buffer when O_DIRECT alignment rules are not met."""
        view = _bytes_view(t)
        aligned = t.data_ptr() % DISK_ALIGN == 0 and view.nbytes % DISK_ALIGN == 0
        if aligned or not self.direct:
            return view, False
        return self._bounce(), True

    def _bounce(self) -> memoryview:
        bounce = getattr(self._local, "bounce", None)
        if bounce is None:
            bounce = self._local.bounce = _aligned_buffer(self.slot_bytes)
        return bounce[:self.slot_bytes]

    def alloc(self, layer: int) -> int:
        if self.max_pages is not None and self.used >= self.max_pages:
            raise DiskFullError(f"the disk tier under {self.directory} is at its budget "
                                f"({self.max_pages:,} pages); give it more room or lower --ctx")
        self.used += 1
        if self.free[layer]:
            return self.free[layer].pop()
        self.next_slot[layer] += 1
        return self.next_slot[layer] - 1

    def release(self, layer: int, slot: int) -> None:
        self.used -= 1
        self.used_bytes -= int(self.sizes[layer][slot])
        self.sizes[layer][slot] = 0
        self.free[layer].append(slot)

    def page_size(self, layer: int, slot: int) -> int:
        """Bytes the page in ``slot`` takes on disk."""
        return int(self.sizes[layer][slot])

    def _record(self, layer: int, slot: int, nbytes: int, sums: np.ndarray, bits: int | None,
                meta: torch.Tensor | None) -> None:
        n = slot + 1
        self.sizes[layer] = _grown(self.sizes[layer], n)
        self.sums[layer] = _grown(self.sums[layer], n)
        self.sizes[layer][slot] = nbytes
        self.sums[layer][slot, :len(sums)] = sums
        if self.codec is not None:
            self.bits[layer] = _grown(self.bits[layer], n)
            self.bits[layer][slot] = bits
            held = self.meta[layer]
            if held is None or len(held) < n:
                grown = torch.zeros((max(n, 2 * (len(held) if held is not None else 0), 16), *meta.shape),
                                    dtype=meta.dtype)
                if held is not None:
                    grown[:len(held)] = held
                self.meta[layer] = held = grown
            held[slot] = meta

    def write(self, layer: int, page: torch.Tensor, bits: int | None = None) -> int:
        """Write a sealed page (a CPU tensor of ``page_shape``; with a codec, on any device, encoded at ``bits``
        there); returns its slot."""
        slot = self.alloc(layer)
        fd = self._fd(layer)
        meta = None
        if self.codec is not None:
            bits = bits or self.codec.default_bits
            page, meta = (t.cpu() for t in self.codec.encode(page, bits))   # encoded where the page is
        page = page.contiguous()
        src = _bytes_view(page)
        nbytes = -(-src.nbytes // DISK_ALIGN) * DISK_ALIGN   # whole blocks, the last one padded with zeros
        view, bounced = self._io_view(page)
        if not bounced and nbytes != src.nbytes:
            view, bounced = self._bounce(), True
        if bounced:
            view[:src.nbytes] = src
            view[src.nbytes:nbytes] = bytes(nbytes - src.nbytes)
        try:
            written = os.pwrite(fd, view[:nbytes], slot * self.slot_bytes)
            if written != nbytes:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            self.used -= 1
            self.free[layer].append(slot)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full writing KV page {slot} of layer {layer} to {self.path(layer)}; "
                                    f"free space there or point --disk elsewhere") from None
            raise UserError(f"cannot write KV page to {self.path(layer)}: {e.strerror or e}") from None
        self._record(layer, slot, src.nbytes, block_sums(np.frombuffer(view[:nbytes], np.uint8)), bits, meta)
        self.used_bytes += src.nbytes
        self.bytes_written += src.nbytes
        return slot

    def read_into(self, layer: int, slot: int, out: torch.Tensor, verify: bool = False) -> None:
        """Read a page into ``out`` (contiguous CPU tensor of ``page_shape``, pinned ideally), decoded if need be."""
        if self.codec is not None:
            bits = int(self.bits[layer][slot])
            data = self.read_blocks(layer, slot, 0, -(-self.codec.page_bytes(bits) // DISK_ALIGN))
            out.copy_(self.codec.decode(data, self.meta[layer][slot], bits, out.dtype))
            return
        fd = self._fd(layer)
        view, bounced = self._io_view(out)
        nbytes = self.slot_bytes if (bounced or self.direct) else self.geometry.page_bytes
        got = os.preadv(fd, [view[:nbytes]], slot * self.slot_bytes)
        if got < self.geometry.page_bytes:
            raise UserError(f"KV page {slot} of layer {layer} is truncated in {self.path(layer)}")
        dst = _bytes_view(out)
        if bounced:
            dst[:] = view[:dst.nbytes]
        self.bytes_read += dst.nbytes
        if verify:
            whole = np.zeros(-(-dst.nbytes // DISK_ALIGN) * DISK_ALIGN, np.uint8)   # the last block as written
            whole[:dst.nbytes] = np.frombuffer(dst, np.uint8)
            self._check(layer, np.full(len(whole) // DISK_ALIGN, slot), np.arange(len(whole) // DISK_ALIGN), whole)

    def _check(self, layer: int, slots: np.ndarray, blocks: np.ndarray, data: np.ndarray) -> None:
        """Blocks ``blocks`` of the pages in ``slots`` (one entry per block), read as ``data`` (uint8, one
        block after the other), against their checksums."""
        bad = np.flatnonzero(block_sums(data) != self.sums[layer][slots, blocks])
        if len(bad):
            i = bad[0]
            raise UserError(f"KV page {slots[i]} of layer {layer} in {self.path(layer)} is corrupt (checksum "
                            f"mismatch in its block {blocks[i]}): the disk tier cannot be trusted; remove "
                            f"{self.directory} and prefill again")

    def read_blocks(self, layer: int, slot: int, first: int, n: int) -> torch.Tensor:
        """Blocks ``first .. first+n-1`` (of `DISK_ALIGN` bytes) of the page in ``slot``, as a uint8 tensor of
        ``n * DISK_ALIGN`` bytes, each checked against its checksum."""
        buf = _aligned_buffer(n * DISK_ALIGN)   # fresh: reader threads call this concurrently
        out = np.frombuffer(buf, np.uint8).reshape(n, DISK_ALIGN)
        self.read_runs(layer, np.array([slot]), np.array([first]), np.array([n]), out, np.array([0]))
        return torch.from_numpy(out.reshape(-1))   # over the read's own buffer, no copy

    def read_runs(self, layer: int, slots: np.ndarray, firsts: np.ndarray, counts: np.ndarray, out: np.ndarray,
                  rows: np.ndarray) -> None:
        """Runs of consecutive blocks, run i being blocks ``firsts[i] ..`` (``counts[i]`` of them) of the page in
        ``slots[i]``, each read with one ``preadv`` into rows ``rows[i] ..`` of ``out`` ((n, DISK_ALIGN) uint8,
        page-aligned rows: an mmap), then all checked against their checksums in one pass. Safe to call from
        several threads at once (on different rows)."""
        fd = self._fd(layer)
        view = memoryview(out.reshape(-1))
        for slot, first, n, row in zip(slots.tolist(), firsts.tolist(), counts.tolist(), rows.tolist()):
            got = os.preadv(fd, [view[row * DISK_ALIGN:(row + n) * DISK_ALIGN]],
                            slot * self.slot_bytes + first * DISK_ALIGN)
            if got < n * DISK_ALIGN:
                raise UserError(f"KV page {slot} of layer {layer} is truncated in {self.path(layer)}")
        self.bytes_read += int(counts.sum()) * DISK_ALIGN
        # every block read: its page's slot, its index in the page, its row of ``out``
        read = out[run_items(rows, counts)].reshape(-1)
        self._check(layer, np.repeat(slots, counts), run_items(firsts, counts), read)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
