"""LeoAM (arXiv 2506.20187): variable-size chunks per layer, min/max key abstracts on the GPU, chunks fetched.

    cache.py      `LeoAM`, the cache: options (`LeoAMConfig`), the store, stats; the planner's arithmetic
    layer.py      one layer's prefill (exact) and decode (score abstracts, select within the budget, fetch, attend)
    chunking.py   variable chunks from measured attention (16-token units), fixed chunks, the abstracts

Kernels: `chunk_scores` (min/max upper bound), `topk_ids`, `slot_assign`, `gather_pages`, `sparse_attention`;
the chunk cache and the store reads are `offload.chunks` (`ChunkBuffer`, `StoreChunks`, whose disk path
`offload.disk_reads.LayerChunks` replaces: reader threads, a bounded host cache, prefetch a layer ahead), the
exact prefill `offload.streamed`, the quantized disk pages `offload.disk_codec` (`kv_quant`'s kernels).
"""

from __future__ import annotations

from dataclasses import replace

from ....units import format_bytes
from ..base import Footprint, PlanInputs, Policy, StepBytes, register
from .cache import LeoAM, LeoAMConfig, disk_ratio, fitting_options, plan_bytes


class LeoAMPolicy(Policy):
    name = "leoam"
    summary = "sparse attention over variable-size chunks scored by min/max key abstracts, the chosen ones fetched"
    sparse = True
    config = LeoAMConfig


    def footprint(self, inputs: PlanInputs) -> Footprint:
        """Abstracts, unit map, chunk cache, sink and window on the device, before any page; int8 abstracts and a
        smaller chunk cache where the full ones would not fit (`fitting_options`), quantized disk pages where the
        pages would not fit the tiers in the KV dtype."""
        cfg = self.parse(inputs.options)
        chosen = fitting_options(inputs.args, inputs.ctx_tokens, inputs.elt, cfg, inputs.gpu_room)
        gpu, _, _ = plan_bytes(inputs.args, inputs.ctx_tokens, inputs.elt, replace(cfg, **chosen))
        room = inputs.gpu_room - gpu + inputs.cpu_room + inputs.disk_room
        if cfg.disk_quant is None and inputs.disk_room and inputs.store_bytes > room:
            chosen["disk_quant"] = "mixed"   # the pages fit the disk only quantized
        quant = replace(cfg, disk_quant=chosen.get("disk_quant", cfg.disk_quant))
        return Footprint(gpu_bytes=gpu, what="abstracts and chunk cache", options=chosen,
                         disk_ratio=disk_ratio(inputs.args, quant))

    def estimate(self, inputs: PlanInputs, fp: Footprint, plan) -> StepBytes:
        """The abstracts scored from device memory; the selected chunks' K and V over PCIe (from device memory when
        the GPU holds every page), the disk's share of them from disk (chunks are spread like the pages)."""
        cfg = replace(self.parse(inputs.options), **fp.options)
        ctx = inputs.ctx_tokens
        _, abstract, step = plan_bytes(inputs.args, ctx, inputs.elt, cfg)
        disk = step * plan.disk.tokens / ctx * fp.disk_ratio if ctx else 0.0
        # each selected 16-token unit on disk is a read of its own (K and V together when quantized)
        unit_bytes = 16 * inputs.args.head_dim * inputs.elt
        reads = step / (2 * unit_bytes) * plan.disk.tokens / ctx * (1 if cfg.disk_quant else 2) if ctx else 0.0
        off_gpu = step * (ctx - plan.gpu.tokens) / ctx if ctx else 0.0   # what the GPU tier does not hold
        over_pcie = inputs.on_gpu and plan.gpu.tokens < ctx
        out = StepBytes(hbm=abstract + (step - off_gpu if over_pcie else step), h2d=off_gpu if over_pcie else 0.0,
                        disk=disk, disk_reads=reads,
                        how="leoam: weights once from GPU memory, the abstracts scored, the selected chunks over "
                            "PCIe / from disk (a read per unit there)")
        cache = (f"a chunk cache of {cfg.cache_factor:g} budgets" if cfg.cache_factor else
                 "no chunk cache (one buffer the layers share)")
        out.notes.append(f"leoam keeps {format_bytes(fp.gpu_bytes)} on the GPU ({cfg.abstract_dtype} abstracts, "
                         f"{cache}, sink and window) and reads up to {format_bytes(step)} of K and V a step at "
                         f"full context (fewer with chunks still in its cache)")
        if reads >= 10_000:
            out.notes.append(f"leoam may read {reads:,.0f} separate units from disk a step at full context (none of "
                             f"them cached): a smaller budget (--policy-opt budget=2048) or more --cpu-mem reads fewer")
        if cfg.disk_quant and plan.disk.tokens:
            how = {"int8": "int8", "int4": "int4", "mixed": "int8, int4 where attention is flat"}[cfg.disk_quant]
            out.notes.append(f"leoam writes the disk's pages quantized (disk_quant={cfg.disk_quant}: {how}), "
                             f"their scales in host memory")
        return out

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        return LeoAM(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)


register(LeoAMPolicy())

__all__ = ["LeoAM", "LeoAMConfig"]
