"""The LouisKV policy over the tiered store: retrieval only at semantic boundaries, over clusters and segments.

LouisKV (arXiv 2510.11292; research/methods.md) as localkv runs it. Per layer the device keeps the sink, a window
of recent tokens and a centroid per index entry: a k-means cluster unit of the prompt's keys, or a segment of
generated tokens (`index`); the K and V of every indexed token live in the `KVStore` (GPU, pinned CPU or disk
pages; quantized on disk with ``disk_quant``), the prompt's rows in cluster order so a cluster is one read. A
decode step reuses the last selection unless its query turned (`layer`): most steps move nothing.

Prefill is exact (`offload.streamed`), over the store and the window. ``tau`` is the trigger's threshold per
layer: ``localkv eval --calibrate`` fits it to a model (`calibrate`) and stores it beside the model cache, where
the engine finds it; ``--policy-opt tau=…`` overrides it.

`LouisKVConfig` lists the options; `stats` reports the retrieval rate (share of layer-steps that retrieved),
the budget, units selected, index entries, the unit cache's hit rate, bytes fetched per token per source and,
with ``measure_recall=True``, the exact attention mass the attended tokens held.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ....errors import UserError
from ....models.args import ModelArgs
from ....units import parse_bytes
from ...chunks import CPU_TIER, DEVICE_TIER, DISK_TIER
from ...disk_codec import QuantizedPages, disk_ratio as quantized_ratio
from ...disk_reads import BLOCK, DiskBlocks
from ...pages import PageGeometry
from ...pipeline import BlockReader
from ...store import Budgets, KVStore
from ...streamed import SparseStoreCache
from ..base import parse_options
from .index import UNIT
from .layer import LouisKVLayer

DEFAULT_BUDGET_TOKENS = 2048
"""The default budget's floor, as the other sparse policies have it; past 128K the share 1/64 takes over."""

DEFAULT_TAU = 0.7
"""The trigger's threshold for a model with no calibration (the paper's value)."""

CALIBRATION_RATE = 0.15
"""`calibrate` sets each layer's ``tau`` so that this share of its steps falls under it: the retrieval rate comes
out near 0.2 with the forced refreshes (``max_reuse``) and the steps after a prompt on top."""

DEFAULT_CACHE_FACTOR = 2.0
"""The unit cache's size, in budgets, when neither the user nor the plan sets one."""

SIMILARITY_KEPT = 8192
"""Most recent trigger similarities each layer keeps for `calibrate`."""


@dataclass
class LouisKVConfig:
    """Options of the LouisKV policy (``make_cache(..., **options)``, ``Engine(..., **options)``)."""

    budget: int | float | None = None
    """Tokens a retrieval selects per KV head: an int, a share of the context (float, e.g. 1/16), or None for
    `DEFAULT_BUDGET_TOKENS` or 1/64 of the context, whichever is more. Sink and window come on top."""
    tau: float | list | None = None
    """Retrieve when the mean cosine of consecutive queries falls under this (one value, or one per layer). None:
    the model's calibration (``localkv eval --calibrate``), else `DEFAULT_TAU`."""
    max_reuse: int = 32
    """Steps a selection is reused at most before a retrieval is forced."""
    cluster_tokens: int = 1024
    """Prompt tokens clustered together (a multiple of 16; ``cluster_tokens / 16`` clusters of ~16 tokens)."""
    kmeans_iters: int = 6
    """Rounds of k-means per group."""
    max_segment_tokens: int = 128
    """Longest output segment (a multiple of 16): a span with no boundary is cut this often."""
    output_tokens: int = 256
    """Recent generated tokens kept exact on the device (the buffer of recent segments) before they are indexed."""
    sink_tokens: int = 64
    """First tokens kept exact on the device (a multiple of 16)."""
    window_tokens: int = 64
    """Last prompt tokens kept exact on the device."""
    cache_factor: float | None = None
    """Units the GPU unit cache holds per KV head, in budgets (least recently used go first; at least 1: a reused
    selection stays in it). None: 2, or 1 where the plan needs it."""
    disk_quant: str | None = None
    """Pages on the disk tier quantized (`offload.disk_codec`): "int8" or "int4"; None: as they are in memory, or
    "int8" where the plan needs it (the context fits the tiers only with its disk pages quantized)."""
    io_threads: int | None = None
    """Threads reading the selected units' disk blocks (0: on the decode thread). None: twice the CPU cores, at
    most 16."""
    disk_cache_bytes: int = 64 << 20
    """Host bytes of disk blocks kept after they are read; "256MB" is read too."""
    measure_recall: bool = False
    """Also measure ``attention_recall`` (keeps every rotated key aside on the device: for evaluation only)."""
    page_tokens: int = 256
    """Tokens per page of the store (a multiple of 16)."""
    block_pages: int = 64
    """Pages per block streamed by the exact prefill."""
    ring_blocks: int = 4
    """Device staging blocks of the prefill's stream."""

    def __post_init__(self):
        if isinstance(self.disk_cache_bytes, str):
            self.disk_cache_bytes = parse_bytes(self.disk_cache_bytes)
        for name in ("cluster_tokens", "max_segment_tokens", "sink_tokens", "page_tokens"):
            value = getattr(self, name)
            if value < (0 if name == "sink_tokens" else UNIT) or value % UNIT:
                raise UserError(f"{name} must be a positive multiple of {UNIT}, got {value}")
        if self.cluster_tokens > 32768:
            raise UserError(f"cluster_tokens must be at most 32768, got {self.cluster_tokens}")
        if isinstance(self.budget, float) and self.budget <= 0 or isinstance(self.budget, int) and self.budget < 0:
            raise UserError(f"budget must be positive, got {self.budget}")
        if self.max_reuse < 0 or self.kmeans_iters < 1 or self.cache_factor is not None and self.cache_factor < 1:
            raise UserError("max_reuse must be >= 0, kmeans_iters >= 1 and cache_factor >= 1")
        if self.window_tokens < 1 or self.output_tokens < 0:
            raise UserError("window_tokens must be >= 1 and output_tokens >= 0")
        if self.disk_quant not in (None, "int8", "int4"):
            raise UserError(f"disk_quant must be 'int8' or 'int4', got {self.disk_quant!r}")
        if isinstance(self.tau, str):   # --policy-opt tau=0.8 arrives parsed; a list only from a calibration
            raise UserError(f"tau must be a number, got {self.tau!r}")



def budget_tokens(budget: int | float | None, n_tokens: int) -> int:
    """Tokens per KV head a retrieval selects (the rule of `LouisKVConfig.budget`)."""
    if budget is None:
        return max(DEFAULT_BUDGET_TOKENS, math.ceil(n_tokens / 64))
    if isinstance(budget, float):
        return math.ceil(budget * n_tokens)
    return int(budget)


def layer_taus(tau: float | list | None, n_layers: int) -> list[float]:
    """``tau`` as one threshold per layer."""
    if tau is None:
        return [DEFAULT_TAU] * n_layers
    if isinstance(tau, (int, float)):
        return [float(tau)] * n_layers
    if len(tau) != n_layers:
        raise UserError(f"tau has {len(tau)} values for {n_layers} layers (a calibration of another model?)")
    return [float(t) for t in tau]


def disk_ratio(args: ModelArgs, cfg: LouisKVConfig) -> float:
    """Disk bytes of a page over its bytes in memory (bf16), for the planner."""
    if not cfg.disk_quant:
        return 1.0
    return quantized_ratio(args.n_kv_heads, args.head_dim, cfg.page_tokens, 4 if cfg.disk_quant == "int4" else 8)


def plan_bytes(args: ModelArgs, ctx_tokens: int, elt: int, cfg: LouisKVConfig | None = None) -> tuple[int, int, int]:
    """(device bytes besides the pages, centroid bytes a retrieval scores, unit bytes a retrieval selects) at
    ``ctx_tokens``. The device holds a centroid per unit at most (every unit a cluster) and the unit map, the unit
    cache (``cache_factor`` budgets of K and V), the sink and the window (the prompt's tail, the output buffer,
    the steps between seals and a cluster group still filling)."""
    cfg = cfg or LouisKVConfig()
    cols = args.n_kv_heads * args.head_dim
    units = ctx_tokens / UNIT
    selected = min(ctx_tokens, -(-budget_tokens(cfg.budget, ctx_tokens) // UNIT) * UNIT)
    centroids = units * cols * elt
    window = cfg.sink_tokens + cfg.window_tokens + cfg.output_tokens + cfg.max_reuse + cfg.cluster_tokens + 2 * UNIT
    factor = DEFAULT_CACHE_FACTOR if cfg.cache_factor is None else cfg.cache_factor
    per_layer = centroids + units * 8 + factor * selected * 2 * cols * elt + window * 2 * cols * elt
    L = args.n_layers
    return int(L * per_layer), int(L * centroids), int(L * selected * 2 * cols * elt)


def fitting_options(args: ModelArgs, ctx_tokens: int, elt: int, cfg: LouisKVConfig, room: int) -> dict:
    """The unit cache's size where the user left it open: the default, or one budget where the device part would
    not fit ``room`` with a fifth of it left for pages (the planner refuses with its numbers if that fails too)."""
    if cfg.cache_factor is not None:
        return {}
    fits = plan_bytes(args, ctx_tokens, elt, cfg)[0] <= 0.8 * room
    return {} if fits else {"cache_factor": 1.0}


class LouisKV(SparseStoreCache):
    """Sparse attention retrieved at semantic boundaries over k-means clusters and output segments."""

    name = "louiskv"

    def __init__(self, args: ModelArgs, capacity: int, *, budgets: Budgets | None, device: torch.device | str,
                 dtype: torch.dtype, **options):
        super().__init__(capacity)
        self.config = cfg = parse_options(LouisKVConfig, "louiskv", options)
        self.args = args
        self.n_layers = args.n_layers
        self.tau = layer_taus(cfg.tau, args.n_layers)
        device = torch.device(device)
        geometry = PageGeometry(args.n_layers, args.n_kv_heads, args.head_dim, cfg.page_tokens, dtype)
        if budgets is None:   # the whole context on the device
            budgets = Budgets(geometry.n_pages(capacity) * geometry.page_bytes * args.n_layers, 0)
        codec = None
        if cfg.disk_quant:
            codec = QuantizedPages(geometry, default_bits=4 if cfg.disk_quant == "int4" else 8)
        self.store = KVStore(geometry, budgets, device, disk_codec=codec)
        self.reader = BlockReader(self.store, block_pages=cfg.block_pages, ring_blocks=cfg.ring_blocks)
        self.cache_factor = DEFAULT_CACHE_FACTOR if cfg.cache_factor is None else cfg.cache_factor
        step_units = -(-budget_tokens(cfg.budget, capacity) // UNIT) * args.n_kv_heads
        unit_blocks = 2 * max(1, UNIT * args.head_dim * dtype.itemsize // BLOCK)
        threads = cfg.io_threads if cfg.io_threads is not None else min(16, 2 * (os.cpu_count() or 1))
        self.disk_blocks = DiskBlocks(self.store, threads, cfg.disk_cache_bytes,
                                      min_blocks=2 * step_units * unit_blocks)
        self.generated = np.zeros(capacity + 1, bool)   # tokens a decode step produced (indexed as output)
        self.similarity = [deque(maxlen=SIMILARITY_KEPT) for _ in range(args.n_layers)]
        self.moved = torch.zeros(3, dtype=torch.long, device=device)   # head-units read per tier (device/CPU/disk)
        self.hits = torch.zeros((), dtype=torch.long, device=device)   # selected head-units found in the cache
        self.recall = torch.zeros(2, dtype=torch.float64, device=device)  # Σ recall, rows measured
        self.selected_units = 0    # head-units selected, over layers, heads and retrievals
        self.retrievals = 0        # layer-steps that retrieved
        self.layer_steps = 0       # layer-steps decoded
        self.decode_tokens = 0     # tokens decoded (counted once per forward)
        self.step_retrieved = False   # a layer of the current step retrieved
        self.layers = [LouisKVLayer(self, i) for i in range(args.n_layers)]

    def budget_tokens(self, n: int) -> int:
        return budget_tokens(self.config.budget, n)

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.reader.drain()
        self._prefill_from = None
        for lay in self.layers:
            lay.truncate(n)

    def step_kind(self) -> str:
        """"retrieve" when a layer of the last step scored and fetched, "reuse" when every layer reused."""
        return "retrieve" if self.step_retrieved else "reuse"

    def token_runs(self, layer, n_tokens):
        return self.layers[layer].token_runs(n_tokens)

    def stats(self):
        g = self.store.geometry
        unit_bytes = UNIT * g.head_dim * g.dtype.itemsize
        moved = (self.moved * unit_bytes).tolist()
        per_token = max(1, self.decode_tokens)
        hits, disk = int(self.hits), self.disk_blocks
        store = self.store.stats()
        if self.store.device.type == "cuda":   # the gather's reads of pinned memory (the store counts its own)
            store["moved_bytes"]["h2d"] += moved[CPU_TIER]
        clustered, segments = (sum(x) / self.n_layers for x in zip(*(lay.entries() for lay in self.layers)))
        out = {
            **super().stats(), **store,
            "policy": "louiskv",
            "retrieval_rate": self.retrievals / self.layer_steps if self.layer_steps else 0.0,
            "tau": sum(self.tau) / len(self.tau), "max_reuse": self.config.max_reuse,
            "budget_tokens": min(self.budget_tokens(self.length), self.length),
            "units_selected": self.selected_units / max(1, self.retrievals * self.args.n_kv_heads),
            "clusters": clustered, "segments": segments,
            "hit_rate": hits / self.selected_units if self.selected_units else 0.0,
            "moved_bytes_per_token": {"gpu": moved[DEVICE_TIER] / per_token, "cpu": moved[CPU_TIER] / per_token,
                                      "disk": moved[DISK_TIER] / per_token, "disk_read": disk.bytes_read / per_token},
            "disk_wait_ms_per_token": 1e3 * disk.wait_s / per_token,
            "cpu_cache_hit_rate": disk.hits / disk.requests if disk.requests else 0.0,
            "index_device_bytes": sum(lay.device_bytes() for lay in self.layers),
            "disk_quant": self.config.disk_quant,
        }
        if self.config.measure_recall:
            total, rows = self.recall.tolist()
            out["attention_recall"] = total / rows if rows else None
        return out


def calibrate(cache: LouisKV, rate: float = CALIBRATION_RATE) -> dict:
    """``tau`` per layer from a teacher-forced run's trigger similarities: the ``rate`` quantile of each layer's, so
    that share of its steps would retrieve. Raises UserError when the run decoded too few steps to tell."""
    taus = []
    for layer, seen in enumerate(cache.similarity):
        if len(seen) < 16:
            raise UserError(f"calibrating louiskv needs at least 17 decoded tokens (layer {layer} saw {len(seen)})")
        taus.append(round(float(np.quantile(np.array(seen), rate)), 4))
    return {"tau": taus}
