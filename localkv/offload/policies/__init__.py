"""Policies: views over the KV store that decide what each step attends to, one folder each.

The interface and the registry are in `base` (its docstring lists the verbs and the folder layout). Importing
this package imports every policy folder beside it, each of which registers itself; nothing else in localkv
names a policy.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from ...models.args import ModelArgs
from ..kv import KVCache
from ..store import Budgets
from .base import (DEFAULT, REFERENCE, Footprint, PlanInputs, Policy, StepBytes, get, names, reference, register,
                   scoped, unregister)

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")


def make_cache(policy: str, args: ModelArgs, capacity: int, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, budgets: Budgets | None = None, **options) -> KVCache:
    """A fresh cache of ``capacity`` tokens under the named policy.

    Without ``budgets`` the KV stays whole in the device's memory (the fast path when it fits); with them
    it goes to the tiered store.
    """
    spec = get(policy)
    spec.parse(options)   # a bad option fails here, with the policy's name, before anything is allocated
    return spec.make(args, capacity, budgets=budgets, device=torch.device(device), dtype=dtype, **options)


__all__ = ["DEFAULT", "REFERENCE", "Footprint", "PlanInputs", "Policy", "StepBytes", "get", "make_cache", "names",
           "reference", "register", "scoped", "unregister"]
