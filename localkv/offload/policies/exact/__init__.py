"""The exact policy: full attention over every token, wherever the KV lives. The correctness oracle.

    device.py   the KV whole in the device's memory (`DeviceExactKV`), graphable
    tiered.py   the KV over the tiered store (`TieredExactKV`): prefix pages streamed block by block

A decode step reads every KV byte once, which is the floor this policy is measured against; the planner's
default estimate (`Policy.estimate`) is exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Policy, register
from .device import DeviceExactKV
from .tiered import TieredExactKV


@dataclass
class ExactConfig:
    """Options of the exact policy over the tiered store (the device path has none)."""

    page_tokens: int = 256
    """Tokens per page of the store."""
    block_pages: int = 64
    """Pages per block streamed from the tiers."""
    ring_blocks: int = 4
    """Device staging blocks of the stream."""


class ExactPolicy(Policy):
    name = "exact"
    summary = "full attention over every token: the reference the sparse policies are held to"
    config = ExactConfig

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        if budgets is None:
            return DeviceExactKV(args, capacity)
        return TieredExactKV(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)


register(ExactPolicy())

__all__ = ["DeviceExactKV", "ExactConfig", "TieredExactKV"]
