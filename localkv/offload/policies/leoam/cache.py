"""The LeoAM policy over the tiered store: variable-size chunks with min/max abstracts, the selected ones fetched.

LeoAM (arXiv 2506.20187; research/methods.md) as localkv runs it. Every token's K and V go to the `KVStore`
(keys rotated, as the exact policy writes them, so both views can share a store). Per layer the device keeps
the sink, the recent window, and for every sealed chunk its elementwise min and max key (the *abstract*); a
decode step scores the abstracts, gathers the best chunks within the token budget from whichever tier holds them
(GPU, pinned CPU or disk pages: from disk only the 4 KB blocks holding them are read), and attends exactly over
``sink | selected chunks | window``. `layer` says how a step runs, `chunking` how chunks are cut. With
``disk_quant`` the pages the store sends to disk (the oldest: cold KV) are quantized (`offload.disk_codec`), int8
or, for the pages of attention deserts, int4, and the selected units read from them are dequantized on the device.

Prefill is exact (`offload.streamed`). A resumed session (`load_tokens`) chunks its
tokens with keys standing in for the queries a session does not keep, so its chunks may differ from the live
run's; everything else is a function of the token sequence, so truncation continues as a run that never had the
tail.

`LeoAMConfig` lists the options (``make_cache("leoam", ..., budget=1/16, chunking="fixed")``); `stats` reports
the budget, chunks and units selected, chunk sizes, the chunk cache's hit rate, bytes fetched per token per
source and, with ``measure_recall=True``, the exact attention mass the attended tokens held.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from ....errors import UserError
from ....models.args import ModelArgs
from ....units import parse_bytes
from ...chunks import CPU_TIER, DEVICE_TIER, DISK_TIER, ChunkBuffer
from ...disk_codec import QuantizedPages, disk_ratio as quantized_ratio
from ...pages import PageGeometry
from ...pipeline import BlockReader
from ...store import Budgets, KVStore
from ...streamed import SparseStoreCache
from .chunking import UNIT
from ...disk_reads import BLOCK, DiskBlocks
from ..base import parse_options
from .layer import LeoAMLayer


DEFAULT_BUDGET_TOKENS = 2048
"""The default budget's floor. SmolLM2-135M, licence texts, 8,000 tokens, 64 teacher-forced tokens: a budget of 512
gives KL 0.084 / top-1 0.81, 1024 gives 0.046 / 0.89, 2048 gives 0.025 / 0.92 (`localkv eval`, docs/benchmarks.md).
Past 128K the share 1/64 takes over, as ShadowKV's does."""


@dataclass
class LeoAMConfig:
    """Options of the LeoAM policy (``make_cache(..., **options)``, ``Engine(..., **options)``)."""

    budget: int | float | None = None
    """Tokens each decode step selects per KV head: an int, a share of the context (float, e.g. 1/16), or None
    for `DEFAULT_BUDGET_TOKENS` or 1/64 of the context, whichever is more. Sink and window come on top."""
    chunking: str = "variable"
    """"variable": chunks of 16 to ``max_chunk_tokens`` tokens cut where attention concentrates; "fixed":
    ``chunk_tokens`` each."""
    chunk_tokens: int = 64
    """Tokens per chunk with ``chunking="fixed"`` (a multiple of 16)."""
    chunk_mass: float = 0.0625
    """Variable chunks: the share of a block's measured attention a chunk may hold before it is cut."""
    max_chunk_tokens: int = 64
    """Variable chunks: the largest chunk (a multiple of 16, at most ``block_tokens``). Measured on SmolLM2-135M at
    4K, budget 1/8: max 256 (mass 1/8) KL 0.068 top-1 0.81; max 64 (mass 1/16) KL 0.050 top-1 0.89; fixed 16-token
    chunks KL 0.033 top-1 0.91: the min/max bound of a large chunk is loose and wastes the budget."""
    size_penalty: float = 1.0
    """Variable chunks: a chunk of ``c`` units competes with its bound lowered by ``size_penalty * log2(c)``
    attention logits (``q·k / sqrt(D)``): the min/max bound of a large chunk is loose, so it would win spuriously.
    SmolLM2-135M, licence texts, 4K, budget 512: penalty 0 KL 0.051 top-1 0.891, 0.5 KL 0.048 top-1 0.922,
    1 KL 0.047 top-1 0.922, 2 KL 0.043 top-1 0.922 (+25% / +62% chunk bytes moved against 0)."""
    block_tokens: int = 256
    """Tokens sealed (and chunked) at a time, a multiple of 16; the recent window holds up to this many more than
    ``window_tokens``."""
    score_queries: int = 32
    """Queries after a block whose attention over it decides its chunks."""
    sink_tokens: int = 64
    """First tokens kept exact on the device (a multiple of 16)."""
    window_tokens: int = 64
    """Most recent tokens always kept exact on the device (at least ``score_queries`` are)."""
    cache_factor: float | None = None
    """Units the GPU chunk cache holds per KV head, in multiples of the budget (least recently used go first); 0:
    no cache, one buffer the layers share and every step fetches anew. None: 2, or less where the plan needs it."""
    abstract_dtype: str | None = None
    """"int8": abstracts quantized (a scale per chunk and head; half the bytes of bf16, the bound still holds);
    "kv": in the KV dtype. None: "kv", or "int8" where the plan needs it (1M tokens on a 24 GB card)."""
    disk_quant: str | None = None
    """Cold KV on the disk tier quantized (`offload.disk_codec`): "int8"; "mixed", int8 with int4 for the pages of
    attention deserts (no 16-token unit holding over `DESERT_WEIGHT` times its even share of its block's measured
    attention); "int4". None: pages on disk as they are in memory, or "mixed" where the plan needs it (the context
    fits the tiers only with its disk pages quantized)."""
    io_threads: int | None = None
    """Threads reading the selected chunks' disk blocks (0: read on the decode thread, uncached). None: twice the
    CPU cores, at most 16. A step's disk reads are thousands of scattered 4 KB blocks, served faster the more are
    in flight (NVMe drives want 16 or more), but each thread costs the host: on the 2-core CPU machine
    (SmolLM2-135M shape, 32K, quantized disk pages) a step took 612 ms with 4 threads and 715 ms with 16."""
    disk_cache_bytes: int = 64 << 20
    """Host bytes of disk blocks kept after they are read (least recently used go first); "256MB" is read too."""
    measure_recall: bool = False
    """Also measure ``attention_recall`` (keeps every rotated key aside on the device: for evaluation only)."""
    page_tokens: int = 256
    """Tokens per page of the store (a multiple of 16)."""
    block_pages: int = 64
    """Pages per block streamed by the exact prefill."""
    ring_blocks: int = 4
    """Device staging blocks of the prefill's stream."""

    def __post_init__(self):
        if isinstance(self.disk_cache_bytes, str):   # --policy-opt disk_cache_bytes=256MB
            self.disk_cache_bytes = parse_bytes(self.disk_cache_bytes)
        if self.chunking not in ("variable", "fixed"):
            raise UserError(f"chunking must be 'variable' or 'fixed', got {self.chunking!r}")
        for name in ("chunk_tokens", "max_chunk_tokens", "block_tokens", "sink_tokens", "page_tokens"):
            value = getattr(self, name)
            if value < (0 if name == "sink_tokens" else UNIT) or value % UNIT:
                raise UserError(f"{name} must be a positive multiple of {UNIT}, got {value}")
        if not UNIT <= self.max_chunk_tokens <= min(1024, self.block_tokens):
            raise UserError(f"max_chunk_tokens must be in [16, min(1024, block_tokens)], got {self.max_chunk_tokens}")
        if isinstance(self.budget, float) and self.budget <= 0 or isinstance(self.budget, int) and self.budget < 0:
            raise UserError(f"budget must be positive, got {self.budget}")
        if not 0 < self.chunk_mass <= 1 or self.score_queries < 1 or not (
                self.cache_factor is None or self.cache_factor == 0 or self.cache_factor >= 1):
            raise UserError("chunk_mass must be in (0, 1], score_queries >= 1 and cache_factor 0 or >= 1")
        if self.disk_quant not in (None, "int8", "mixed", "int4"):
            raise UserError(f"disk_quant must be 'int8', 'mixed' or 'int4', got {self.disk_quant!r}")
        if self.abstract_dtype not in (None, "kv", "int8"):
            raise UserError(f"abstract_dtype must be 'kv' or 'int8', got {self.abstract_dtype!r}")



def budget_tokens(budget: int | float | None, n_tokens: int) -> int:
    """Tokens per KV head a step selects: ``budget`` tokens (int), a share of the context (float), or by default
    `DEFAULT_BUDGET_TOKENS` or 1/64 of it, whichever is more."""
    if budget is None:
        return max(DEFAULT_BUDGET_TOKENS, math.ceil(n_tokens / 64))
    if isinstance(budget, float):
        return math.ceil(budget * n_tokens)
    return int(budget)


DESERT_WEIGHT = 2.0
"""``disk_quant="mixed"``: a page goes to disk at int4 when none of its units drew more than this many times its
even share (1 / units) of its block's attention from the block's scoring queries; at int8 otherwise, and when its
blocks are not yet sealed (or it holds sink tokens)."""


def disk_ratio(args: ModelArgs, cfg: LeoAMConfig) -> float:
    """Disk bytes of a page over its bytes in memory (bf16), for the planner; "mixed" counted at int8 (0.5 at int8,
    0.25 at int4; their scales stay in host memory)."""
    if not cfg.disk_quant:
        return 1.0
    return quantized_ratio(args.n_kv_heads, args.head_dim, cfg.page_tokens, 4 if cfg.disk_quant == "int4" else 8)


DEFAULT_CACHE_FACTOR = 2.0
"""The chunk cache's size, in budgets, when neither the user nor the plan sets one."""


def plan_bytes(args: ModelArgs, ctx_tokens: int, elt: int, cfg: LeoAMConfig | None = None) -> tuple[int, int, int]:
    """(device bytes besides the pages, abstract bytes a step reads, chunk bytes a step selects) at ``ctx_tokens``,
    for the planner. Abstracts: kmin and kmax per chunk and KV head, for the most chunks the chunking can cut
    (every chunk 16 tokens, as variable chunks are over keys with no skew), in the KV dtype or int8 with an fp32
    scale; the unit map; the chunk cache (``cache_factor`` budgets of K and V, or one layer's selection shared);
    sink and window (up to a block past ``window_tokens``)."""
    cfg = cfg or LeoAMConfig()
    cols = args.n_kv_heads * args.head_dim
    chunks = ctx_tokens / (cfg.chunk_tokens if cfg.chunking == "fixed" else UNIT)
    selected = min(ctx_tokens, -(-budget_tokens(cfg.budget, ctx_tokens) // UNIT) * UNIT)
    int8 = cfg.abstract_dtype == "int8"
    abstract = chunks * (2 * cols * (1 if int8 else elt) + (4 * args.n_kv_heads if int8 else 0))   # kmin, kmax
    factor = DEFAULT_CACHE_FACTOR if cfg.cache_factor is None else cfg.cache_factor
    per_layer = (abstract + ctx_tokens / UNIT * 8                                   # unit -> chunk map (int64)
                 + factor * selected * 2 * cols * elt                                # the chunk cache
                 + (cfg.sink_tokens + cfg.block_tokens + max(cfg.window_tokens, cfg.score_queries)) * 2 * cols * elt)
    L = args.n_layers
    shared = 0 if factor else selected * 2 * cols * elt                              # no cache: one buffer
    return int(L * per_layer + shared), int(L * abstract), int(L * selected * 2 * cols * elt)


def fitting_options(args: ModelArgs, ctx_tokens: int, elt: int, cfg: LeoAMConfig, room: int) -> dict:
    """What the plan sets of the options the user left open (``abstract_dtype``, ``cache_factor``) so that the
    device part fits ``room`` with a fifth of it left for pages: full-precision abstracts and the default cache
    first, then int8 abstracts, then a smaller cache, then none. The last try when nothing fits (the planner
    then refuses with its numbers)."""
    dtypes = [cfg.abstract_dtype] if cfg.abstract_dtype else ["kv", "int8"]
    factors = [cfg.cache_factor] if cfg.cache_factor is not None else [DEFAULT_CACHE_FACTOR, 1.0, 0.0]
    tries = [(d, f) for f in factors for d in dtypes]
    for dtype, factor in tries:
        trial = replace(cfg, abstract_dtype=dtype, cache_factor=factor)
        if plan_bytes(args, ctx_tokens, elt, trial)[0] <= 0.8 * room:
            break
    return {"abstract_dtype": dtype, "cache_factor": factor}


class LeoAM(SparseStoreCache):
    """Sparse attention over variable-size chunks scored by min/max abstracts, the KV in the tiered store."""

    name = "leoam"

    def __init__(self, args: ModelArgs, capacity: int, *, budgets: Budgets | None, device: torch.device | str,
                 dtype: torch.dtype, **options):
        super().__init__(capacity)
        self.config = cfg = parse_options(LeoAMConfig, "leoam", options)
        self.args = args
        self.n_layers = args.n_layers
        device = torch.device(device)
        geometry = PageGeometry(args.n_layers, args.n_kv_heads, args.head_dim, cfg.page_tokens, dtype)
        if budgets is None:   # the whole context on the device (a CPU machine, or a GPU with room)
            budgets = Budgets(geometry.n_pages(capacity) * geometry.page_bytes * args.n_layers, 0)
        codec = None
        if cfg.disk_quant:
            codec = QuantizedPages(geometry, default_bits=4 if cfg.disk_quant == "int4" else 8)
        self.store = KVStore(geometry, budgets, device, disk_codec=codec)
        if cfg.disk_quant == "mixed":
            self.store.disk_bits = self._disk_bits
        self.reader = BlockReader(self.store, block_pages=cfg.block_pages, ring_blocks=cfg.ring_blocks)
        self.cache_factor = DEFAULT_CACHE_FACTOR if cfg.cache_factor is None else cfg.cache_factor
        self.int8_abstracts = cfg.abstract_dtype == "int8"
        self.shared_buffer = None if self.cache_factor else ChunkBuffer(
            args.n_kv_heads, UNIT, args.head_dim, dtype=dtype, device=device, slot_factor=1.0)
        # room for four layers' worth of a full step's blocks (K and V of every selected unit): the prefetch of
        # the next layer never evicts what this one asked for
        step_units = -(-budget_tokens(cfg.budget, capacity) // UNIT) * args.n_kv_heads
        unit_blocks = 2 * max(1, UNIT * args.head_dim * dtype.itemsize // BLOCK)
        threads = cfg.io_threads if cfg.io_threads is not None else min(16, 2 * (os.cpu_count() or 1))
        self.disk_blocks = DiskBlocks(self.store, threads, cfg.disk_cache_bytes,
                                      min_blocks=4 * step_units * unit_blocks)
        self.moved = torch.zeros(3, dtype=torch.long, device=device)   # head-units read per tier (device/CPU/disk)
        self.hits = torch.zeros((), dtype=torch.long, device=device)   # selected head-units found in the cache
        self.recall = torch.zeros(2, dtype=torch.float64, device=device)  # Σ recall, rows measured
        self.selected_units = 0    # head-units selected, over layers, heads and steps
        self.selected_chunks = 0   # distinct chunks among them
        self.selection_rows = 0    # (layer, head, step) triples that selected
        self.decode_tokens = 0     # tokens decoded (counted once per forward)
        self.layers = [LeoAMLayer(self, i) for i in range(args.n_layers)]

    def budget_tokens(self, n: int) -> int:
        return budget_tokens(self.config.budget, n)

    def _disk_bits(self, layer: int, page: int) -> int:
        weight = self.layers[layer].page_weight(page)
        return 4 if weight is not None and weight <= DESERT_WEIGHT else 8

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.reader.drain()
        self._prefill_from = None
        for lay in self.layers:
            lay.truncate(n)
        self.store.truncate(n)

    def stats(self):
        g = self.store.geometry
        unit_bytes = UNIT * g.head_dim * g.dtype.itemsize
        moved = (self.moved * unit_bytes).tolist()
        per_token = max(1, self.decode_tokens)
        sizes = [t for lay in self.layers for t in lay.chunk_tokens()]
        hits = int(self.hits)
        disk = self.disk_blocks
        store = self.store.stats()
        if self.store.device.type == "cuda":   # the gather's reads of pinned memory (the store counts its own)
            store["moved_bytes"]["h2d"] += moved[CPU_TIER]
        out = {
            **super().stats(), **store,
            "policy": "leoam",
            "chunking": self.config.chunking,
            "abstract_dtype": "int8" if self.int8_abstracts else "kv", "cache_factor": self.cache_factor,
            "budget_tokens": min(self.budget_tokens(self.length), self.length),
            "chunks_selected": self.selected_chunks / max(1, self.selection_rows),
            "units_selected": self.selected_units / max(1, self.selection_rows),
            "chunks": len(sizes) / self.n_layers,
            "chunk_tokens_mean": sum(sizes) / len(sizes) if sizes else 0.0,
            "chunk_tokens_min": min(sizes, default=0), "chunk_tokens_max": max(sizes, default=0),
            "hit_rate": hits / self.selected_units if self.selected_units else 0.0,
            "moved_bytes_per_token": {"gpu": moved[DEVICE_TIER] / per_token, "cpu": moved[CPU_TIER] / per_token,
                                      "disk": moved[DISK_TIER] / per_token,          # selected chunks on disk
                                      "disk_read": disk.bytes_read / per_token},     # pages read for them
            "disk_wait_ms_per_token": 1e3 * disk.wait_s / per_token,
            "cpu_cache_hit_rate": disk.hits / disk.requests if disk.requests else 0.0,
            "disk_prefetch_skipped": (disk.prefetches_skipped / (disk.prefetches + disk.prefetches_skipped)
                                      if disk.prefetches + disk.prefetches_skipped else 0.0),
            "index_device_bytes": sum(lay.device_bytes() for lay in self.layers),
            "disk_quant": self.config.disk_quant,
        }
        if self.store.disk is not None and self.store.disk.codec is not None:
            disk = self.store.disk
            bits = np.concatenate([b[z > 0] for b, z in zip(disk.bits, disk.sizes)])   # the slots in use
            out["disk_pages_int4"] = float((bits == 4).mean()) if len(bits) else 0.0
        if self.config.measure_recall:
            total, rows = self.recall.tolist()
            out["attention_recall"] = total / rows if rows else None
        return out
