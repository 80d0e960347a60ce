"""Timing of the engine's two compute steps: a chunked prefill, and decode steps one by one.

Both go through ``Engine.prefill`` and ``Engine.decode_one``, the path ``localkv run`` takes (CUDA graphs for
decode where the cache allows them), so the numbers are what a user gets. On a GPU every timed region ends with
a device synchronize, so a time is what the person waiting sees.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

OOM = (torch.OutOfMemoryError, MemoryError)
"""What running out of device or host memory raises; a row that hits it reports "OOM"."""


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_prefill(engine, seq, n_tokens: int, progress: Callable[[str], None] | None = None) -> float:
    """Prefill ``n_tokens`` random ids into ``seq`` in the engine's chunks; returns the seconds it took."""
    device, chunk = engine.model.device, engine.prefill_chunk
    ids = torch.randint(0, engine.model.args.vocab_size, (n_tokens,)).tolist()
    sync(device)
    t0 = last = time.perf_counter()
    for s in range(0, n_tokens, chunk):
        engine.prefill(seq, ids[s:s + chunk])
        if progress is not None and time.perf_counter() - last > 10:
            sync(device)
            last = time.perf_counter()
            progress(f"  prefill {s + chunk:,}/{n_tokens:,} tokens, {(s + chunk) / (last - t0):,.0f} tok/s")
    sync(device)
    return time.perf_counter() - t0


def decode_times(engine, seq, steps: int, kinds: list | None = None) -> list[float]:
    """Run ``steps`` decode steps (one random token each, appended to ``seq``); seconds of each. ``kinds``, if
    given, gets each step's `KVCache.step_kind`."""
    device = engine.model.device
    tokens = torch.randint(0, engine.model.args.vocab_size, (steps,)).tolist()
    times = []
    for token in tokens:
        sync(device)
        t = time.perf_counter()
        engine.decode_one(seq, token)
        sync(device)
        times.append(time.perf_counter() - t)
        if kinds is not None:
            kinds.append(seq.cache.step_kind())
    return times


def by_kind(times: list[float], kinds: list) -> dict | None:
    """Median ms and count of the steps of each kind, or None when the policy's steps have no kinds."""
    if not any(kinds):
        return None
    out = {}
    for kind in sorted({k for k in kinds if k}):
        ms = [1e3 * t for t, k in zip(times, kinds) if k == kind]
        out[kind] = {"median_ms": percentile(ms, 50), "steps": len(ms)}
    return out


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
