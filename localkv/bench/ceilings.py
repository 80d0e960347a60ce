"""The machine's ceilings, measured in the same run as the benchmark they bound.

    hbm_copy     device memory traffic of a device-to-device copy (bytes read + written per second)
    h2d_pinned   pinned host memory -> device over PCIe
    host_memcpy  host memory traffic of a host-to-host copy (the "device" memory on a CPU-only machine)
    disk_read    O_DIRECT ``os.preadv`` of 1 MiB requests from 8 threads, the way the disk tier reads pages

A ceiling that does not apply (no GPU; no disk tier in use) is None and prints as n/a.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 1e9


@dataclass
class Ceilings:
    """Measured bandwidths in bytes per second (None where they do not apply)."""

    host_memcpy: float
    hbm_copy: float | None = None
    h2d_pinned: float | None = None
    disk_read: float | None = None

    @property
    def device_memory(self) -> float:
        """The rate at which a decode step reads weights and resident KV: HBM on a GPU, RAM on a CPU."""
        return self.hbm_copy or self.host_memcpy

    def to_dict(self) -> dict[str, float | None]:
        return {f"{k}_GBps": (v / GB if v else None) for k, v in self.__dict__.items()}


def median_seconds(fn, cuda: bool, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` (CUDA events on a GPU)."""
    for _ in range(warmup):  # first-touch page faults, lazy CUDA init
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_rate(n_bytes: int, device: str = "cpu") -> float:
    """Memory traffic (read + write) of copying ``n_bytes`` within one memory, bytes/s."""
    x = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n_bytes / median_seconds(lambda: y.copy_(x), device != "cpu")


def h2d_rate(n_bytes: int) -> float:
    """Pinned host -> GPU copy, bytes/s."""
    h = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    return n_bytes / median_seconds(lambda: d.copy_(h, non_blocking=True), True)


def disk_read_rate(directory: Path, n_bytes: int, request: int = 2**20, threads: int = 8) -> float:
    """Read a fresh ``n_bytes`` file under ``directory`` with O_DIRECT preadv from threads, bytes/s.

    Where the file system refuses O_DIRECT (tmpfs) the read is buffered, after dropping the file's cached pages.
    """
    n_bytes = max(request, n_bytes // request * request)
    Path(directory).mkdir(parents=True, exist_ok=True)   # the run's disk tier goes here next: make it now
    path = Path(directory) / ".localkv-ceiling.bin"
    chunk = os.urandom(min(n_bytes, 64 * 2**20))  # the content is irrelevant; only the bytes' count matters
    try:
        with open(path, "wb") as f:
            for off in range(0, n_bytes, len(chunk)):
                f.write(chunk[:n_bytes - off])
            f.flush()
            os.fsync(f.fileno())
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = memoryview(mmap.mmap(-1, n_bytes))  # page-aligned, as O_DIRECT requires

        def read(i: int) -> int:
            return os.preadv(fd, [buf[i * request:(i + 1) * request]], i * request)

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, range(n_bytes // request)))
        rate = total / (time.perf_counter() - t)
        os.close(fd)
        return rate
    finally:
        path.unlink(missing_ok=True)


def measure_ceilings(device: torch.device, disk_dir: Path | None = None, *, gpu_bytes: int = 2 * 2**30,
                     host_bytes: int = 256 * 2**20, disk_bytes: int | None = None) -> Ceilings:
    """Measure what applies on this machine: GPU copies on a GPU, the disk where ``disk_dir`` is given."""
    on_gpu = device.type == "cuda"
    c = Ceilings(host_memcpy=copy_rate(host_bytes))
    if on_gpu:
        c.hbm_copy = copy_rate(gpu_bytes, str(device))
        c.h2d_pinned = h2d_rate(gpu_bytes)
        torch.cuda.empty_cache()
    if disk_dir is not None:
        c.disk_read = disk_read_rate(disk_dir, disk_bytes or (2 * 2**30 if on_gpu else 256 * 2**20))
    return c
