"""Policies: views over the KV that decide what each step attends to. One file per policy, named here."""

from __future__ import annotations

import torch

from ...errors import UserError
from ...models.args import ModelArgs
from ..kv import KVCache
from ..store import Budgets
from .exact import DeviceExactKV
from .exact_tiered import TieredExactKV
from .shadowkv import ShadowKV

POLICIES = ("exact", "shadowkv")


def make_cache(policy: str, args: ModelArgs, capacity: int, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, budgets: Budgets | None = None, **options) -> KVCache:
    """A fresh cache of ``capacity`` tokens under the named policy.

    Without ``budgets`` the KV stays whole in the device's memory (the fast path when it fits); with them
    it goes to the tiered store.
    """
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r} (available: {', '.join(POLICIES)})")
    if policy == "shadowkv":
        return ShadowKV(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)
    if budgets is None:
        return DeviceExactKV(args, capacity)
    return TieredExactKV(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)
