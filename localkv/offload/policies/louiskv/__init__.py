"""LouisKV (arXiv 2510.11292): retrieval only at semantic boundaries, over k-means clusters and output segments.

    cache.py      `LouisKV`, the cache: options (`LouisKVConfig`), the store, stats, `calibrate`; the planner's
                  arithmetic
    layer.py      one layer's prefill (exact), sealing, and decode (trigger, retrieve or reuse, attend)
    index.py      the clusters over input keys (k-means, cluster order in the store), the segments over output

Kernels: `kmeans` (assignment), `chunk_scores` (landmark mode, over the centroids), `topk_ids`, `slot_assign`,
`gather_pages`, `sparse_attention`; the unit cache and the store reads are `offload.chunks` and
`offload.disk_reads`, the exact prefill `offload.streamed`, quantized disk pages `offload.disk_codec`.
"""

from __future__ import annotations

from dataclasses import replace

from ....units import format_bytes
from ..base import Footprint, PlanInputs, Policy, StepBytes, register
from .cache import LouisKV, LouisKVConfig, calibrate, disk_ratio, fitting_options, plan_bytes

EXPECTED_RETRIEVAL = 0.25
"""Share of layer-steps that retrieve, for the planner's estimate (the goal on real text; measured in `stats`)."""


class LouisKVPolicy(Policy):
    name = "louiskv"
    summary = "sparse attention retrieved only at semantic boundaries, over k-means clusters and output segments"
    sparse = True
    config = LouisKVConfig


    def footprint(self, inputs: PlanInputs) -> Footprint:
        """Centroids, unit map, unit cache, sink and window on the device, before any page (a unit cache of one
        budget where two do not fit); the disk's pages at int8 where they would not fit the tiers in the KV dtype."""
        cfg = self.parse(inputs.options)
        chosen = fitting_options(inputs.args, inputs.ctx_tokens, inputs.elt, cfg, inputs.gpu_room)
        gpu, _, _ = plan_bytes(inputs.args, inputs.ctx_tokens, inputs.elt, replace(cfg, **chosen))
        room = inputs.gpu_room - gpu + inputs.cpu_room + inputs.disk_room
        if cfg.disk_quant is None and inputs.disk_room and inputs.store_bytes > room:
            chosen["disk_quant"] = "int8"   # the pages fit the disk only quantized
        quant = replace(cfg, disk_quant=chosen.get("disk_quant", cfg.disk_quant))
        return Footprint(gpu_bytes=gpu, what="centroids and unit cache", options=chosen,
                         disk_ratio=disk_ratio(inputs.args, quant),
                         overflow_hint="; or a smaller budget (--policy-opt budget=2048), which needs a smaller unit "
                                       "cache")

    def estimate(self, inputs: PlanInputs, fp: Footprint, plan) -> StepBytes:
        """Every step attends over its cached units (device memory); a retrieving step also scores the centroids and
        fetches its units from their tiers (all counted as misses). Averaged at `EXPECTED_RETRIEVAL`."""
        cfg = replace(self.parse(inputs.options), **fp.options)
        ctx, rate = inputs.ctx_tokens, EXPECTED_RETRIEVAL
        _, centroids, step = plan_bytes(inputs.args, ctx, inputs.elt, cfg)
        disk = step * plan.disk.tokens / ctx * fp.disk_ratio if ctx else 0.0
        unit_bytes = 16 * inputs.args.head_dim * inputs.elt
        reads = step / (2 * unit_bytes) * plan.disk.tokens / ctx * (1 if cfg.disk_quant else 2) if ctx else 0.0
        off_gpu = step * (ctx - plan.gpu.tokens) / ctx if ctx else 0.0
        over_pcie = inputs.on_gpu and plan.gpu.tokens < ctx
        out = StepBytes(hbm=rate * centroids + step + rate * (step - off_gpu if over_pcie else step),
                        h2d=rate * off_gpu if over_pcie else 0.0, disk=rate * disk, disk_reads=rate * reads,
                        how=f"louiskv: weights once from GPU memory; at a retrieval rate of {rate:g}, the centroids "
                            f"scored and the selected units fetched from their tier, else the cached units reused")
        out.notes.append(f"louiskv keeps {format_bytes(fp.gpu_bytes)} on the GPU (a centroid per 16-token cluster, "
                         f"the unit cache, sink and window); a retrieving step reads up to {format_bytes(step)} of K "
                         f"and V, a reusing step none (the retrieval rate is in its stats)")
        if cfg.disk_quant and plan.disk.tokens:
            out.notes.append(f"louiskv writes the disk's pages quantized (disk_quant={cfg.disk_quant}), their "
                             f"scales in host memory")
        return out

    def calibrate(self, cache) -> dict:
        """``tau`` per layer from the trigger similarities of a teacher-forced run (`cache.calibrate`)."""
        return calibrate(cache)

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        return LouisKV(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)


register(LouisKVPolicy())

__all__ = ["LouisKV", "LouisKVConfig"]
