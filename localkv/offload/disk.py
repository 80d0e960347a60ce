"""The disk tier: one file per layer under ``--disk DIR``, fixed page slots aligned for O_DIRECT.

Slot ``s`` of layer ``l`` lives at byte ``s * slot_bytes`` of ``layer_{l:03d}.kv``. A page is written once
(KV is append-only) with its crc32 kept in memory and in a session's manifest, and the crc32 of each of its
4096-byte blocks, so that a policy reading a few chunks of a page (`read_blocks`) checks what it read; reads go
through O_DIRECT where the file system supports it (the page cache would otherwise hide the disk's real speed and
double the memory a long context takes), and fall back to buffered I/O where it does not (tmpfs refuses O_DIRECT).
I/O is plain ``os.pwrite``/``os.preadv`` into caller-owned buffers; buffers that are not 4096-aligned
go through an aligned bounce buffer.
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


def check_writable(directory: Path) -> None:
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
        raise UserError(f"--disk {directory} is not writable: {e.strerror or e}") from None


class DiskTier:
    """Page slots in per-layer files. ``max_pages`` caps the pages over all layers (None: the disk's room)."""

    def __init__(self, geometry: PageGeometry, directory: Path, max_pages: int | None = None,
                 o_direct: bool = True):
        self.geometry = geometry
        self.directory = Path(directory)
        check_writable(self.directory)
        self.max_pages = max_pages
        self.want_direct = o_direct and hasattr(os, "O_DIRECT")
        self.direct: bool | None = None  # decided at the first open
        self.fds: dict[int, int] = {}
        self.next_slot = [0] * geometry.n_layers
        self.free: list[list[int]] = [[] for _ in range(geometry.n_layers)]
        self.checksums: dict[tuple[int, int], int] = {}
        self.block_checksums: dict[tuple[int, int], np.ndarray] = {}   # (layer, slot) -> crc32 per block
        self.used = 0
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
            bounce = self._local.bounce = _aligned_buffer(self.geometry.slot_bytes)
        return bounce[:self.geometry.slot_bytes], True

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
        self.checksums.pop((layer, slot), None)
        self.block_checksums.pop((layer, slot), None)
        self.free[layer].append(slot)

    def write(self, layer: int, page: torch.Tensor) -> int:
        """Write a sealed page (CPU tensor of ``page_shape``); returns its slot."""
        slot = self.alloc(layer)
        fd = self._fd(layer)
        page = page.contiguous()
        src = _bytes_view(page)
        view, bounced = self._io_view(page)
        if bounced:
            view[:src.nbytes] = src
        nbytes = self.geometry.slot_bytes if (bounced or self.direct) else src.nbytes
        try:
            written = os.pwrite(fd, view[:nbytes], slot * self.geometry.slot_bytes)
            if written != nbytes:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            self.used -= 1
            self.free[layer].append(slot)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full writing KV page {slot} of layer {layer} to {self.path(layer)}; "
                                    f"free space there or point --disk elsewhere") from None
            raise UserError(f"cannot write KV page to {self.path(layer)}: {e.strerror or e}") from None
        self.checksums[(layer, slot)] = zlib.crc32(src)
        self.block_checksums[(layer, slot)] = np.fromiter(
            (zlib.crc32(src[i:i + DISK_ALIGN]) for i in range(0, src.nbytes, DISK_ALIGN)), np.uint32)
        self.bytes_written += src.nbytes
        return slot

    def read_into(self, layer: int, slot: int, out: torch.Tensor, verify: bool = False) -> None:
        """Read a page into ``out`` (contiguous CPU tensor of ``page_shape``, pinned ideally)."""
        fd = self._fd(layer)
        view, bounced = self._io_view(out)
        nbytes = self.geometry.slot_bytes if (bounced or self.direct) else self.geometry.page_bytes
        got = os.preadv(fd, [view[:nbytes]], slot * self.geometry.slot_bytes)
        if got < self.geometry.page_bytes:
            raise UserError(f"KV page {slot} of layer {layer} is truncated in {self.path(layer)}")
        dst = _bytes_view(out)
        if bounced:
            dst[:] = view[:dst.nbytes]
        self.bytes_read += dst.nbytes
        if verify and zlib.crc32(dst) != self.checksums.get((layer, slot)):
            raise UserError(f"KV page {slot} of layer {layer} in {self.path(layer)} is corrupt (checksum mismatch)")

    def read_blocks(self, layer: int, slot: int, first: int, n: int) -> torch.Tensor:
        """Blocks ``first .. first+n-1`` (of `DISK_ALIGN` bytes) of the page in ``slot``, as a uint8 tensor of
        ``n * DISK_ALIGN`` bytes (the last block of a page may be cut short), each checked against its crc32."""
        fd = self._fd(layer)
        nbytes = n * DISK_ALIGN
        buf = _aligned_buffer(nbytes)   # fresh: reader threads call this concurrently
        got = os.preadv(fd, [buf], slot * self.geometry.slot_bytes + first * DISK_ALIGN)
        end = min(nbytes, self.geometry.page_bytes - first * DISK_ALIGN)
        if got < end:
            raise UserError(f"KV page {slot} of layer {layer} is truncated in {self.path(layer)}")
        sums = self.block_checksums.get((layer, slot))
        for i in range(n):
            a, b = i * DISK_ALIGN, min((i + 1) * DISK_ALIGN, end)
            if sums is not None and a < b and zlib.crc32(buf[a:b]) != int(sums[first + i]):
                raise UserError(f"KV page {slot} of layer {layer} in {self.path(layer)} is corrupt (checksum "
                                f"mismatch in its block {first + i}): the disk tier cannot be trusted; remove "
                                f"{self.directory} and prefill again")
        self.bytes_read += end
        return torch.frombuffer(buf, dtype=torch.uint8)   # over the read's own buffer, no copy

    @property
    def used_bytes(self) -> int:
        return self.used * self.geometry.page_bytes

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
