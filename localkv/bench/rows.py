"""A result row: decode timings, the cache's own numbers (``stats()``), and the floor they are held against.

Caches report what they know; a row takes what is there and leaves the rest out (a sparse policy may add
``hit_rate`` or ``bytes_moved``; the all-on-device exact cache reports no tiers, so all its tokens are on the
device).
"""

from __future__ import annotations

import statistics

import torch

from .ceilings import Ceilings
from .floor import decode_floor_s
from .measure import percentile

TIERS = ("gpu", "cpu", "disk")


def kv_bytes_per_token(args, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize


def plain(value):
    """``cache.stats()`` values as JSON can hold them."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def moved_bytes(stats: dict) -> dict[str, float]:
    """Bytes moved so far, per link; the store says ``moved_bytes``, a policy may say ``bytes_moved``."""
    moved = stats.get("moved_bytes", stats.get("bytes_moved", {}))
    return dict(moved) if isinstance(moved, dict) else {"total": moved}


def moved_per_token(before: dict, after: dict, steps: int) -> dict[str, float]:
    return {k: (v - before.get(k, 0)) / steps for k, v in after.items() if isinstance(v, (int, float))}


def tier_tokens(stats: dict) -> dict[str, int]:
    """Tokens per tier; a cache that reports no tiers holds all its tokens in device memory."""
    if not any(f"{t}_tokens" in stats for t in TIERS):
        return {"gpu": stats.get("tokens", 0), "cpu": 0, "disk": 0}
    return {t: stats.get(f"{t}_tokens", 0) for t in TIERS}


def peak_bytes(stats: dict) -> dict[str, int]:
    """Bytes each tier holds at the end of the run (KV only grows during one, so this is the peak)."""
    return {"gpu": stats.get("gpu_bytes", stats.get("device_bytes", 0)), "cpu": stats.get("cpu_bytes", 0),
            "disk": stats.get("disk_bytes", 0)}


def make_row(label: str, ctx: int, kv: str, prefill_s: float | None, times: list[float], tokens: dict[str, int],
             per_token: int, weights: int, ceilings: Ceilings, **extra) -> dict:
    """One result: decode statistics and their floors: ``ratio`` = measured median / the floor of reading the
    whole context (`decode_floor_s`), ``ratio_weights`` = median / the weights alone at the device rate."""
    median_ms = 1e3 * statistics.median(times)
    floor_s = decode_floor_s(weights, {t: n * per_token for t, n in tokens.items()}, ceilings)
    floor_ms = None if floor_s is None else 1e3 * floor_s
    weights_ms = 1e3 * decode_floor_s(weights, {}, ceilings)
    return {"label": label, "ctx": ctx, "kv": kv,
            "prefill_tok_s": ctx / prefill_s if prefill_s else None,
            "decode_ms_median": median_ms, "decode_ms_p90": 1e3 * percentile(times, 90), "steps": len(times),
            "tier_tokens": tokens, "floor_ms": floor_ms, "ratio": median_ms / floor_ms if floor_ms else None,
            "weights_floor_ms": weights_ms, "ratio_weights": median_ms / weights_ms, **extra}


def failed_row(label: str, ctx: int, why: str) -> dict:
    """A row that could not run: ``why`` is "OOM" or "n/a (reason)"."""
    return {"label": label, "ctx": ctx, "error": why}
