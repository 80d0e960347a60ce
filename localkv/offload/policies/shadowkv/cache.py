"""The ShadowKV policy over the tiered store: low-rank keys and landmarks on the device, values fetched sparsely.

ShadowKV (arXiv 2410.21465; research/methods.md) as localkv runs it. The full K and V of every token go to the
`KVStore` (keys rotated, as the exact policy writes them, so both views can share a store). When the context
spills past the GPU tier and CPU memory can hold all of it, the GPU tier caches values only, twice the tokens,
since decode reads nothing else from the store (`values_on_gpu`, `KVStore.gpu_values`). The policy adds a
device-side index per layer and attends, at each decode step, to

    sink | outliers | selected chunks | recent window (local chunks + generated tokens)

- **prefill** is exact (the tiered exact policy's streamed attention over the stored prefix and the chunk); its
  keys then extend the index: U rows on the low-rank basis (`lowrank`), a landmark and a coherence per
  8-token chunk once it leaves the recent window, outliers chosen again (`index`);
- **decode** (1..γ tokens) scores the landmarks, takes the top-k chunks per KV head within ``budget``
  (`selection`), reuses the chunks still in the layer's slot buffer, fetches only the misses' values from
  wherever the store keeps them (`offload.chunks`, on a side stream on a GPU) while the keys of the selected
  chunks are rebuilt from U and SV with RoPE (`kernels.lowrank_rope`), then one `kernels.sparse_attention`
  over the exact dense part and the selected slots;
- **generated tokens** stay exact in the recent window, with room for ``window_tokens`` (ShadowKV's own buffer
  holds ~100, unchecked); past that the older ones are sealed into indexed chunks like the prompt's.

Every piece of the index is a function of the token sequence (not of how it was chunked or when it was
truncated), so ``truncate`` and a session saved and resumed (`token_runs` exports the store's rotated keys,
`load_tokens` rebuilds the index from them un-rotated) continue exactly as a run that never stopped.

`ShadowKVConfig` lists the options (``make_cache("shadowkv", ..., budget=1/16, rank=64)``); `stats` reports
selection size, hit rate, bytes moved per tier, rank, reconstruction error, device bytes of the index and,
with ``measure_recall=True``, the exact attention mass the attended tokens held.

With ``exact_keys=False`` (the ShadowKV paper's own setting) the store keeps values only: half the host memory
(1M tokens of Llama-3.1-8B in bf16: 68.7 GB instead of 137 GB). Decode is unchanged: it reads only values from the
store, its keys come from the index and the dense buffer. What needed the exact keys back: the basis is never
refreshed (the first block's stays; ``basis_fixed`` in `stats`); a prefill chunk after the first attends to the
sealed prefix through its low-rank keys (`ShadowKVLayer._held_keys`); a truncation may drop only tokens of the
recent window; a session cannot be saved nor the KV exported (a one-line UserError says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ....errors import UserError
from ....models.args import ModelArgs
from ....models.rope import Rope, rotate_half
from ...chunks import CPU_TIER, DEVICE_TIER, DISK_TIER
from ...machine import gpu_room
from ...pages import PageGeometry
from ...pipeline import BlockReader
from ...store import Budgets, KVStore
from ...streamed import SparseStoreCache
from ..base import parse_options
from .graph import graph_view, signature
from .layer import NO_EXACT_KEYS, ShadowKVLayer


@dataclass
class ShadowKVConfig:
    """Options of the ShadowKV policy (``make_cache(..., **options)``, ``Engine(..., **options)``)."""

    budget: int | float | None = None
    """Tokens each decode step selects per KV head: an int, a share of the context (float, e.g. 1/16), or
    None for 1/64 of the context and at least 2048 tokens. Sink, outliers and the window come on top."""
    rank: int | None = None
    """Rank of the low-rank keys; default 160 per 1024 key columns (ShadowKV's for Llama-3-8B), scaled, >= 128."""
    rank_energy: float | None = None
    """Instead of a fixed rank: the fewest directions holding this share of the keys' energy (e.g. 0.95)."""
    refresh_error: float = 0.1
    """Refresh the basis when a block of new keys loses this much more (relative error) than the fitted keys."""
    chunk_tokens: int = 8
    """Tokens per chunk: the unit of landmarks, selection and fetch."""
    sink_tokens: int = 64
    """First tokens kept exact on the device (rounded up to whole chunks). ShadowKV's own 8 with 4 local chunks
    gave twice the KL of 64 with 32 on SmolLM2-135M at 4K (budget 512: 0.025 against 0.012)."""
    local_chunks: int = 32
    """Whole chunks the recent window keeps (besides the partial last one) when older tokens are indexed."""
    window_tokens: int = 1024
    """Most tokens the exact recent window holds (generated ones included) before the oldest are indexed."""
    outlier_fraction: float = 0.0025
    """Share of the indexed chunks kept exact as outliers, per KV head."""
    min_outliers: int = 4
    """At least this many outlier chunks per KV head (when that many are indexed)."""
    slot_factor: float = 2.0
    """Slots of the per-layer chunk buffer, per selected chunk: the room for hits from earlier steps."""
    block_tokens: int = 256
    """Tokens per block of the low-rank basis's refresh rule."""
    index_tier: str | None = None
    """Where U and the landmarks live: "gpu", or "cpu" (pinned memory the GPU reads in place each step, for a
    context whose index does not fit beside the weights: ~1M tokens of an 8B model on 24 GB). `localkv.load`
    passes the planner's choice; None applies the planner's rule (`index_on_host`) to the GPU memory left."""
    measure_recall: bool = False
    """Also measure ``attention_recall`` (keeps every rotated key aside on the device: for evaluation only)."""
    page_tokens: int = 256
    """Tokens per page of the store."""
    block_pages: int = 64
    """Pages per block streamed by the exact prefill."""
    ring_blocks: int = 4
    """Device staging blocks of the prefill's stream."""
    exact_keys: bool = True
    """Keep every token's exact key in the store beside its value. False halves the store, as the ShadowKV paper
    does: the basis stays the first block's, a later prefill chunk sees the prefix through the low-rank keys,
    truncation reaches back only within the recent window, and the KV cannot be saved or exported."""

    def __post_init__(self):
        C = self.chunk_tokens
        if C < 1 or self.page_tokens % C:
            raise UserError(f"page_tokens ({self.page_tokens}) must be a multiple of chunk_tokens ({C})")
        if isinstance(self.budget, float) and self.budget <= 0 or isinstance(self.budget, int) and self.budget < 0:
            raise UserError(f"budget must be positive, got {self.budget}")
        if self.index_tier not in (None, "gpu", "cpu"):
            raise UserError(f"index_tier must be 'gpu' or 'cpu', got {self.index_tier!r}")
        if self.rank is not None and self.rank < 1 or self.rank_energy is not None and not 0 < self.rank_energy <= 1:
            raise UserError("rank must be >= 1 and rank_energy in (0, 1]")
        self.sink_tokens = -(-self.sink_tokens // C) * C
        self.window_tokens = max(self.window_tokens, (self.local_chunks + 1) * C)



class RopeTable:
    """cos/sin (m, D) for positions 0..m-1 in the KV dtype, grown on demand, shared by the layers: what
    `kernels.lowrank_rope` indexes by position, and the inverse RoPE of keys read back from the store."""

    def __init__(self, rope: Rope, dtype: torch.dtype, capacity: int):
        self.rope, self.dtype, self.capacity = rope, dtype, capacity
        self.cos = self.sin = torch.empty(0, rope.dim, dtype=dtype, device=rope.inv_freq.device)

    def ensure(self, n: int) -> None:
        if self.cos.shape[0] >= n:
            return
        m = min(self.capacity, max(n, 2 * self.cos.shape[0], 1024))
        rp = self.rope.positions(torch.arange(m, device=self.rope.inv_freq.device), self.dtype, 0)
        self.cos, self.sin = rp.cos.contiguous(), rp.sin.contiguous()

    def unrotate(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Pre-RoPE keys (T, H, D) fp32 from rotated ``k`` at positions start..: RoPE is a rotation by θ scaled
        by the attention factor a (YaRN), so its inverse is ``(x*cos - rotate_half(x)*sin) / a²`` with the
        scaled tables."""
        self.ensure(start + k.shape[0])
        c = self.cos[start:start + k.shape[0]].float()[:, None]   # (T, 1, D)
        s = self.sin[start:start + k.shape[0]].float()[:, None]
        k = k.float()
        return (k * c - rotate_half(k) * s) / self.rope.attention_factor ** 2


def values_on_gpu(need: int, gpu_bytes: int, cpu_bytes: int) -> bool:
    """Whether a store of K and V (``need`` bytes at full context) spends its GPU tier on copies of values
    (`KVStore.gpu_values`): when the context spills past the GPU tier anyway, and the CPU tier can hold all of it.
    A decode step reads only values from the store, and a GPU tier of values holds twice the tokens. (With a disk
    in play the CPU tier would hold the newest pages, whose values the GPU has: older values would come from disk.)"""
    return gpu_bytes < need <= cpu_bytes


def store_parts(options: dict) -> int:
    """Parts of a store page under these options, for the planner: 2 (K and V), or 1 with ``exact_keys=False``."""
    return 2 if parse_options(ShadowKVConfig, "shadowkv", options).exact_keys else 1


def host_part_bytes(args: ModelArgs, ctx_tokens: int, elt: int) -> tuple[int, int]:
    """(U bytes, landmark bytes) at ``ctx_tokens`` under the default options: the part of the index that
    ``index_tier="cpu"`` keeps on the host."""
    from .lowrank import default_rank

    cols, per_layer = args.n_kv_heads * args.head_dim, args.n_layers * ctx_tokens * elt
    return (int(per_layer * default_rank(args.n_kv_heads, args.head_dim)),
            int(per_layer * cols / ShadowKVConfig.chunk_tokens))


def plan_bytes(args: ModelArgs, ctx_tokens: int, elt: int) -> tuple[int, int]:
    """(device bytes of the index, value bytes a decode step fetches) at ``ctx_tokens`` under the default
    options, for the planner: U rows and landmarks of every layer (`host_part_bytes`), the chunk slots, the
    exact dense part and the Gram sums; the selected chunks' values."""
    from .selection import budget_chunks

    cfg = ShadowKVConfig()
    cols = args.n_kv_heads * args.head_dim
    selected = budget_chunks(cfg.budget, ctx_tokens, cfg.chunk_tokens) * cfg.chunk_tokens
    outliers = max(cfg.min_outliers, cfg.outlier_fraction * ctx_tokens / cfg.chunk_tokens) * cfg.chunk_tokens
    per_layer = (cfg.slot_factor * selected * 2 * cols * elt                       # chunk slots, K and V
                 + (cfg.window_tokens + cfg.sink_tokens + outliers) * 2 * cols * elt  # the exact dense part
                 + 2 * cols * cols * 4)                                            # the Gram sums (fp32)
    index = int(args.n_layers * per_layer) + sum(host_part_bytes(args, ctx_tokens, elt))
    step = selected * args.n_layers * cols * elt
    return index, step


def index_on_host(args: ModelArgs, ctx_tokens: int, elt: int, gpu_room: int) -> bool:
    """The planner's rule: U and the landmarks go to pinned CPU memory when the whole index of ``ctx_tokens``
    (`plan_bytes`) does not fit in ``gpu_room``, the GPU memory the KV may take (counted before any page)."""
    return plan_bytes(args, ctx_tokens, elt)[0] > gpu_room


class ShadowKV(SparseStoreCache):
    """Sparse attention over low-rank keys and fetched values, the KV in the tiered store."""

    name = "shadowkv"

    def __init__(self, args: ModelArgs, capacity: int, *, budgets: Budgets | None, device: torch.device | str,
                 dtype: torch.dtype, **options):
        super().__init__(capacity)
        self.config = cfg = parse_options(ShadowKVConfig, "shadowkv", options)
        self.args = args
        self.n_layers = args.n_layers
        device = torch.device(device)
        geometry = PageGeometry(args.n_layers, args.n_kv_heads, args.head_dim, cfg.page_tokens, dtype,
                                parts=2 if cfg.exact_keys else 1)
        need = geometry.n_pages(capacity) * geometry.page_bytes * args.n_layers
        if budgets is None:  # the whole context on the device (a CPU machine, or a GPU with room)
            budgets = Budgets(need, 0)
        self.store = KVStore(geometry, budgets, device, gpu_values=cfg.exact_keys and values_on_gpu(
            need, budgets.gpu_bytes, budgets.cpu_bytes))
        self.reader = BlockReader(self.store, block_pages=cfg.block_pages, ring_blocks=cfg.ring_blocks)
        self.tables = RopeTable(Rope(args, device), dtype, capacity)
        self.index_host = device.type == "cuda" and (cfg.index_tier == "cpu" or cfg.index_tier is None and index_on_host(
            args, capacity, dtype.itemsize, gpu_room(device)))
        """U and the landmarks in pinned CPU memory (`ShadowKVConfig.index_tier`)."""
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        """The stream value fetches run on, overlapping the key rebuild."""
        self.scratch_keys = None if cfg.exact_keys else torch.empty(
            args.n_kv_heads, cfg.page_tokens, args.head_dim, dtype=dtype, device=device)
        """(Hkv, P, D): where a graphed step writes the key meant for the open page of a store of values only."""
        self.moved = torch.zeros(3, dtype=torch.long, device=device)   # chunks read per tier (device/CPU/disk)
        self.hits = torch.zeros((), dtype=torch.long, device=device)   # selected chunks found in a slot
        self.index_reads = 0   # bytes of a host index (landmarks, U rows) the GPU has read in place
        self.recall = torch.zeros(2, dtype=torch.float64, device=device)  # Σ recall, rows measured
        self.selected = 0        # chunks selected, over layers, heads and steps
        self.decode_tokens = 0   # tokens decoded (counted once per forward)
        self.layers = [ShadowKVLayer(self, i) for i in range(args.n_layers)]

    def truncate(self, n: int) -> None:
        for lay in self.layers:
            lay.check_truncate(n)   # before anything changes
        super().truncate(n)
        self.reader.drain()
        self._prefill_from = None
        for lay in self.layers:
            lay.truncate(n)

    def static_view(self, rows: int, length: torch.Tensor):
        """A view for a CUDA-graphed decode step (`graph`), or None when the next step has host work.
        ``rows`` (the exact policy's bucket) does not matter here."""
        return graph_view(self, length)

    def buffers(self) -> tuple:
        """What a captured step has baked in: a graph is valid while this stays the same."""
        return signature(self)

    def token_runs(self, layer, n_tokens):
        self._exportable()
        return super().token_runs(layer, n_tokens)

    def export_pages(self, layer, n_tokens, page_tokens):
        self._exportable()   # now, not at the first page: a session save checks before it writes anything
        return super().export_pages(layer, n_tokens, page_tokens)

    def _exportable(self) -> None:
        if not self.config.exact_keys:
            raise UserError(f"{NO_EXACT_KEYS}: its KV cannot be saved as a session or handed to another "
                            "policy; use exact_keys=True for that")

    def stats(self):
        cfg, g = self.config, self.store.geometry
        chunk_bytes = cfg.chunk_tokens * g.head_dim * g.dtype.itemsize
        moved = (self.moved * chunk_bytes).tolist()
        per_token = max(1, self.decode_tokens)
        index_bytes = sum(lay.device_bytes() for lay in self.layers) + 2 * self.tables.cos.numel() * g.dtype.itemsize
        host_bytes = sum(lay.host_bytes() for lay in self.layers)
        ranks = [lay.lowrank.rank for lay in self.layers]
        errors = [lay.lowrank.error() for lay in self.layers]
        hits = int(self.hits)
        store = self.store.stats()
        if self.store.device.type == "cuda":   # the gather's and the host index's reads of pinned memory
            store["moved_bytes"]["h2d"] += moved[CPU_TIER] + self.index_reads   # (the store counts its own)
        out = {
            **super().stats(), **store,
            "policy": "shadowkv",
            "budget_tokens": self.layers[0].budget_tokens() if self.length else 0,
            "chunks_selected": self.selected / max(1, self.decode_tokens * self.n_layers * g.n_kv_heads),
            "hit_rate": hits / self.selected if self.selected else 0.0,
            "fetched_bytes_per_token": {"device": moved[DEVICE_TIER] / per_token, "cpu": moved[CPU_TIER] / per_token,
                                        "disk": moved[DISK_TIER] / per_token},
            "rank": max(ranks), "ranks": ranks,
            "reconstruction_error": sum(errors) / len(errors),
            "basis_refreshes": sum(lay.lowrank.refreshes for lay in self.layers),
            "basis_fixed": not cfg.exact_keys,   # no exact keys to refresh it from: the first block's stays
            "exact_keys": cfg.exact_keys,
            "outliers": sum(lay.index.outliers.shape[1] for lay in self.layers) / len(self.layers),
            "index_device_bytes": index_bytes,
            "index_tier": "cpu" if self.index_host else "gpu",
            "index_host_bytes": host_bytes,
            "index_read_bytes_per_token": self.index_reads / per_token,   # of a host index, over PCIe
        }
        if cfg.measure_recall:
            total, rows = self.recall.tolist()
            out["attention_recall"] = total / rows if rows else None
        return out
