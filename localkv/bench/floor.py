"""The floor of a decode step: every byte it must read, read once, at the measured rate of the link it crosses.

    floor = (weights + device-resident KV) / device memory bandwidth   (HBM copy; host memcpy on a CPU)
          + KV in pinned CPU memory / pinned host->device bandwidth    (PCIe; on a CPU this tier is RAM too)
          + KV on disk / disk read bandwidth

This is the exact policy's floor: it reads the whole context every step. The three terms add, since on a PC
the PCIe link and the disk (behind the same link) do not overlap with each other; compute is assumed hidden.
A sparse policy is put against the same floor, so its ratio below 1 says how far under exact attention it gets.
The weights alone (``decode_floor_s(weights, {}, ...)``) are the floor no policy goes under: sparse policies'
goals are stated against it (a sparse policy at 128K: within 2x).
"""

from __future__ import annotations

from .ceilings import Ceilings


def decode_floor_s(weights_bytes: int, kv_bytes: dict[str, int], ceilings: Ceilings) -> float | None:
    """Seconds per token at the floor; None when a tier holds KV but its bandwidth was not measured.

    Args:
        weights_bytes: parameter bytes, all read once per token.
        kv_bytes: KV bytes per tier, ``{"gpu": ..., "cpu": ..., "disk": ...}`` (missing tiers hold 0).
        ceilings: this machine's measured bandwidths.
    """
    device_s = (weights_bytes + kv_bytes.get("gpu", 0)) / ceilings.device_memory
    pinned = kv_bytes.get("cpu", 0)
    pinned_bw = ceilings.h2d_pinned or ceilings.host_memcpy
    on_disk = kv_bytes.get("disk", 0)
    if on_disk and not ceilings.disk_read:
        return None
    return device_s + pinned / pinned_bw + (on_disk / ceilings.disk_read if on_disk else 0.0)
