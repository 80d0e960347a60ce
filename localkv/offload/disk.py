"""The disk tier: one file per layer under ``--disk DIR``, fixed page slots aligned for O_DIRECT.

Slot ``s`` of layer ``l`` lives at byte ``s * slot_bytes`` of ``layer_{l:03d}.kv``. A page is written once
(KV is append-only) with the crc32 of each of its 4096-byte blocks kept in memory, so that a whole page read
back (`read_into`) and a policy reading a few chunks of one (`read_blocks`) both check what they read; reads go
through O_DIRECT where the file system supports it (the page cache would otherwise hide the disk's real speed and
double the memory a long context takes), and fall back to buffered I/O where it does not (tmpfs refuses O_DIRECT).
I/O is plain ``os.pwrite``/``os.preadv`` into caller-owned buffers; buffers that are not 4096-aligned
go through an aligned bounce buffer.

With a ``codec`` (`disk_codec.QuantizedPages`) pages are stored as int8 or int4 codes, each at the bits its
writer asked for (``page_bits``), their scales in host memory (``meta``), and `read_into` decodes them;
`read_blocks` returns codes, which the caller decodes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import zlib
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
        self.page_bits: dict[tuple[int, int], int] = {}   # (layer, slot) -> bits of its encoding (codec only)
        self.meta: dict[tuple[int, int], torch.Tensor] = {}   # (layer, slot) -> its scales and zeros (codec only)
        self.stored: dict[tuple[int, int], int] = {}      # (layer, slot) -> bytes its page takes
        self.directory = Path(directory)
        check_writable(self.directory)
        self.max_pages = max_pages
        self.want_direct = o_direct and hasattr(os, "O_DIRECT")
        self.direct: bool | None = None  # decided at the first open
        self.fds: dict[int, int] = {}
        self.next_slot = [0] * geometry.n_layers
        self.free: list[list[int]] = [[] for _ in range(geometry.n_layers)]
        self.block_checksums: dict[tuple[int, int], np.ndarray] = {}   # (layer, slot) -> crc32 per block
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
        bounce = getattr(self._local, "bounce", None)
        if bounce is None:
            bounce = self._local.bounce = _aligned_buffer(self.slot_bytes)
        return bounce[:self.slot_bytes], True

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
        self.used_bytes -= self.stored.pop((layer, slot), 0)
        self.page_bits.pop((layer, slot), None)
        self.meta.pop((layer, slot), None)
        self.block_checksums.pop((layer, slot), None)
        self.free[layer].append(slot)

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
        view, bounced = self._io_view(page)
        if bounced:
            view[:src.nbytes] = src
        nbytes = -(-src.nbytes // DISK_ALIGN) * DISK_ALIGN if (bounced or self.direct) else src.nbytes
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
        self.block_checksums[(layer, slot)] = np.fromiter(
            (zlib.crc32(src[i:i + DISK_ALIGN]) for i in range(0, src.nbytes, DISK_ALIGN)), np.uint32)
        if self.codec is not None:
            self.page_bits[(layer, slot)] = bits
            self.meta[(layer, slot)] = meta
        self.stored[(layer, slot)] = src.nbytes
        self.used_bytes += src.nbytes
        self.bytes_written += src.nbytes
        return slot

    def read_into(self, layer: int, slot: int, out: torch.Tensor, verify: bool = False) -> None:
        """Read a page into ``out`` (contiguous CPU tensor of ``page_shape``, pinned ideally), decoded if need be."""
        if self.codec is not None:
            bits = self.page_bits[(layer, slot)]
            data = self.read_blocks(layer, slot, 0, -(-self.codec.page_bytes(bits) // DISK_ALIGN))
            out.copy_(self.codec.decode(data, self.meta[(layer, slot)], bits, out.dtype))
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
            self._check(layer, slot, dst, 0, dst.nbytes)

    def _check(self, layer: int, slot: int, data: memoryview, first: int, nbytes: int) -> None:
        """``nbytes`` bytes of ``data``, the page's blocks from ``first`` on, against their crc32s."""
        sums = self.block_checksums.get((layer, slot))
        if sums is None:
            return
        for i, a in enumerate(range(0, nbytes, DISK_ALIGN)):
            if zlib.crc32(data[a:min(a + DISK_ALIGN, nbytes)]) != int(sums[first + i]):
                raise UserError(f"KV page {slot} of layer {layer} in {self.path(layer)} is corrupt (checksum "
                                f"mismatch in its block {first + i}): the disk tier cannot be trusted; remove "
                                f"{self.directory} and prefill again")

    def read_blocks(self, layer: int, slot: int, first: int, n: int) -> torch.Tensor:
        """Blocks ``first .. first+n-1`` (of `DISK_ALIGN` bytes) of the page in ``slot``, as a uint8 tensor of
        ``n * DISK_ALIGN`` bytes (the last block of a page may be cut short), each checked against its crc32."""
        fd = self._fd(layer)
        nbytes = n * DISK_ALIGN
        buf = _aligned_buffer(nbytes)   # fresh: reader threads call this concurrently
        got = os.preadv(fd, [buf], slot * self.slot_bytes + first * DISK_ALIGN)
        end = min(nbytes, self.stored.get((layer, slot), self.geometry.page_bytes) - first * DISK_ALIGN)
        if got < end:
            raise UserError(f"KV page {slot} of layer {layer} is truncated in {self.path(layer)}")
        self._check(layer, slot, buf, first, end)
        self.bytes_read += end
        return torch.frombuffer(buf, dtype=torch.uint8)   # over the read's own buffer, no copy

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
