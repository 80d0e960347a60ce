"""ShadowKV (arXiv 2410.21465): low-rank pre-RoPE keys and landmarks on the GPU, values fetched sparsely.

    cache.py      `ShadowKV`, the cache: options (`ShadowKVConfig`), the store, stats; the planner's arithmetic
    layer.py      one layer's prefill (exact) and decode (select, fetch, rebuild keys, attend)
    lowrank.py    the low-rank basis of the pre-RoPE keys and its refresh rule
    index.py      landmarks, coherence and outlier chunks
    selection.py  the budget, top-k chunks per KV head by their landmarks
    graph.py      the view a CUDA-graphed decode step runs through

Kernels: `chunk_scores`, `topk_ids`, `slot_assign`, `lowrank_rope`, `gather_pages`, `sparse_attention`,
`rope_append`. Shared with other policies: `offload.chunks` (the selected chunks' values from whichever tier holds
them, the slot buffer that keeps them between steps), `offload.streamed` (the exact prefill). The module docstring
of `cache` says how a step runs.
"""

from __future__ import annotations

from ....units import format_bytes
from ..base import Footprint, PlanInputs, Policy, StepBytes, register
from .cache import ShadowKV, ShadowKVConfig, host_part_bytes, index_on_host, plan_bytes, store_parts, values_on_gpu


class ShadowKVPolicy(Policy):
    name = "shadowkv"
    summary = "sparse attention over low-rank keys and landmarks on the GPU, the selected values fetched"
    sparse = True
    config = ShadowKVConfig


    def store_parts(self, options):
        return store_parts(options)

    def footprint(self, inputs: PlanInputs) -> Footprint:
        """The index (U rows, landmarks, chunk slots, the exact dense part) before any page; U and the
        landmarks go to pinned CPU memory when the whole index does not fit the GPU (`index_on_host`)."""
        args, ctx, elt = inputs.args, inputs.ctx_tokens, inputs.elt
        gpu_index, _ = plan_bytes(args, ctx, elt)
        host_index = 0
        if inputs.on_gpu and index_on_host(args, ctx, elt, inputs.gpu_room):
            host_index = sum(host_part_bytes(args, ctx, elt))
            gpu_index -= host_index
        gpu_left, cpu_left = inputs.gpu_room - gpu_index, inputs.cpu_room - host_index
        parts = self.store_parts(inputs.options)
        hint = ""
        if parts == 2 and inputs.store_bytes // 2 <= gpu_left + cpu_left + inputs.disk_room:
            hint = "; or --policy-opt exact_keys=false, which stores values only (half the bytes)"
        return Footprint(gpu_bytes=gpu_index, cpu_bytes=host_index, what="index",
                         gpu_values=parts == 2 and values_on_gpu(inputs.store_bytes, gpu_left, cpu_left),
                         options={"index_tier": "cpu" if host_index else "gpu"}, overflow_hint=hint)

    def estimate(self, inputs: PlanInputs, fp: Footprint, plan) -> StepBytes:
        """The landmarks scored (an eighth of the index's bytes, read from device memory), the selected chunks'
        values read over PCIe (from device memory when the GPU holds every page), and a host index's landmarks
        over PCIe every step."""
        args, ctx, elt = inputs.args, inputs.ctx_tokens, inputs.elt
        _, step = plan_bytes(args, ctx, elt)
        host_landmarks = host_part_bytes(args, ctx, elt)[1] if fp.cpu_bytes else 0
        over_pcie = plan.gpu.tokens < ctx and inputs.on_gpu
        out = StepBytes(hbm=fp.gpu_bytes / 8 + (0 if over_pcie else step), h2d=(step if over_pcie else 0) + host_landmarks,
                        how="shadowkv: weights once from GPU memory, the landmarks scored, the selected chunks' "
                            "values over PCIe")
        where = (f"on the GPU and {format_bytes(fp.cpu_bytes)} (low-rank keys, landmarks) in pinned CPU memory, "
                 f"read over PCIe each step" if fp.cpu_bytes else "on the GPU (low-rank keys, landmarks)")
        out.notes.append(f"shadowkv keeps {format_bytes(fp.gpu_bytes)} of index {where}, and reads "
                         f"{format_bytes(step)} of values a step at full context "
                         f"(fewer with chunks reused from the step before)")
        if fp.gpu_values:
            out.notes.append(f"shadowkv's GPU tier caches the values of the newest {plan.gpu.tokens:,} tokens, "
                             "which is all a decode step reads from the store; every token's K and V live in "
                             "CPU memory")
        if self.store_parts(inputs.options) == 1:
            out.notes.append("shadowkv with exact_keys=False stores values only (keys come from its low-rank "
                             "index): half the KV bytes, no session save, truncation only within the recent window")
        return out

    def make(self, args, capacity, *, budgets, device, dtype, **options):
        return ShadowKV(args, capacity, budgets=budgets, device=device, dtype=dtype, **options)


register(ShadowKVPolicy())

__all__ = ["ShadowKV", "ShadowKVConfig"]
