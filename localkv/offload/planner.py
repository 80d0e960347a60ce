"""The placement planner: for a model, a context and a machine, how many tokens each tier holds.

Inputs are the model's dimensions, the context, the KV dtype, the user's budgets (``--gpu-mem``,
``--cpu-mem``, ``--disk``) and what the machine has free: GPU memory after the weights
(``torch.cuda.mem_get_info``), RAM (``psutil``), disk (``shutil.disk_usage``), each with headroom.
Tiers fill fastest first. The estimate of ms/token for the exact policy is the time to stream the weights
once from GPU memory plus every offloaded KV byte once over PCIe or from disk (the two overlap with compute
but not with each other on a typical PC's single PCIe link to the GPU). When the context fits no tier
combination the planner refuses with a ContextOverflowError that says by how much.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from ..errors import ContextOverflowError
from ..models.args import ModelArgs
from ..units import format_bytes, format_tokens

GPU_HEADROOM_BYTES = 3 * 2**30  # activations, attention workspace, the staging ring, the allocator's slack
RAM_SHARE = 0.6                    # of available RAM the CPU tier may take by default
DISK_SHARE = 0.9                   # of free disk the disk tier may take by default


@dataclass
class Bandwidths:
    """Bytes per second the estimate assumes (measured ones replace these: ``localkv bench``)."""

    hbm: float = 1.0e12    # a gaming GPU (RTX 4090 ~1 TB/s)
    h2d: float = 25e9      # PCIe 4.0 x16, pinned
    disk: float = 3e9      # a PCIe 4.0 NVMe, random 1 MiB reads


@dataclass
class TierPlan:
    tokens: int = 0
    bytes: int = 0
    budget: int = 0


@dataclass
class Plan:
    """What will live where. ``tiered`` is False when the whole context fits in device memory."""

    model: str
    ctx_tokens: int
    policy: str
    kv_dtype: str
    kv_bytes_per_token: int
    weights_bytes: int
    device: str
    gpu: TierPlan = field(default_factory=TierPlan)
    cpu: TierPlan = field(default_factory=TierPlan)
    disk: TierPlan = field(default_factory=TierPlan)
    disk_dir: str | None = None
    tiered: bool = False
    ms_per_token: float = 0.0
    index_tier: str | None = None
    """shadowkv: where U and the landmarks go ("gpu" or "cpu"), passed to the policy as its ``index_tier``."""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The plan in one line, as ``localkv run`` prints it."""
        parts = [f"{self.model}: {format_tokens(self.ctx_tokens)} context, {self.policy}, KV {self.kv_dtype}"]
        for name, tier in (("GPU", self.gpu), ("CPU", self.cpu), ("disk", self.disk)):
            if tier.tokens:
                parts.append(f"{name} {format_tokens(tier.tokens)} tok ({format_bytes(tier.bytes)})")
        parts.append(f"~{self.ms_per_token:.0f} ms/token at full context")
        return " | ".join(parts)

    def table(self) -> str:
        rows = [f"model          {self.model} on {self.device}",
                f"context        {self.ctx_tokens:,} tokens, policy {self.policy}",
                f"KV             {self.kv_dtype}, {format_bytes(self.kv_bytes_per_token)} per token, "
                f"{format_bytes(self.kv_bytes_per_token * self.ctx_tokens)} in all",
                f"weights        {format_bytes(self.weights_bytes)} on the {self.device.split(':')[0].upper()}",
                "",
                f"{'tier':<8} {'tokens':>12} {'KV bytes':>12} {'budget':>12}"]
        for name, tier in (("GPU", self.gpu), ("CPU", self.cpu), ("disk", self.disk)):
            rows.append(f"{name:<8} {tier.tokens:>12,} {format_bytes(tier.bytes):>12} {format_bytes(tier.budget):>12}")
        if self.disk_dir:
            rows.append(f"disk tier under {self.disk_dir}")
        how = ("shadowkv: weights once from GPU memory, the landmarks scored, the selected chunks' values over "
               "PCIe" if self.policy == "shadowkv" else
               "exact policy: weights once from GPU memory, offloaded KV once over PCIe / from disk")
        rows += ["", f"expected decode at full context: ~{self.ms_per_token:,.0f} ms/token ({how})"]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return asdict(self)


def machine_budgets(device: torch.device, weights_bytes: int, disk_dir: Path | None) -> tuple[int, int, int]:
    """(GPU, CPU, disk) bytes the KV may take by default on this machine, headroom left."""
    ram = int(psutil.virtual_memory().available * RAM_SHARE)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Weights not yet loaded when planning ahead of a load: leave room for them.
        loaded = torch.cuda.memory_allocated(device)
        gpu = max(0, free - max(0, weights_bytes - loaded) - GPU_HEADROOM_BYTES)
        cpu = max(0, ram - weights_bytes if loaded < weights_bytes else ram)
    else:
        gpu, cpu = max(0, ram - weights_bytes), 0  # one memory: the "GPU" tier is the CPU's RAM
    disk = 0
    if disk_dir is not None:
        probe = Path(disk_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        disk = int(shutil.disk_usage(probe).free * DISK_SHARE)
    return gpu, cpu, disk


def make_plan(args: ModelArgs, ctx_tokens: int, *, model: str = "model", policy: str = "exact",
              device: torch.device | str = "cpu", kv_dtype: torch.dtype = torch.bfloat16,
              weights_bytes: int | None = None, gpu_mem: int | None = None, cpu_mem: int | None = None,
              disk: Path | str | None = None, disk_mem: int | None = None, default_disk: Path | None = None,
              bandwidths: Bandwidths | None = None, options: dict | None = None) -> Plan:
    """Decide the tiers for ``ctx_tokens`` of KV; raises ContextOverflowError when it cannot fit.

    Budgets given by the user are used as they are; the others come from the machine. A disk tier is used
    when the user names ``disk``, or when GPU and CPU cannot hold the context and ``default_disk`` is given.
    ``options`` are the policy's (``make_cache(..., **options)``): shadowkv's ``exact_keys=False`` stores values
    only, half the bytes per token.
    """
    device = torch.device(device)
    bw = bandwidths or Bandwidths()
    elt = torch.empty((), dtype=kv_dtype).element_size()
    parts = 2
    if policy == "shadowkv":
        from .policies.shadowkv import store_parts

        parts = store_parts(options or {})
    per_token = parts * args.n_layers * args.n_kv_heads * args.head_dim * elt
    weights = weights_bytes if weights_bytes is not None else args.n_params() * 2
    need = per_token * ctx_tokens
    disk_dir = Path(disk).expanduser() if disk is not None else None
    gpu_free, cpu_free, _ = machine_budgets(device, weights, None)
    gpu_budget = gpu_mem if gpu_mem is not None else gpu_free
    cpu_budget = cpu_mem if cpu_mem is not None else cpu_free
    if disk_dir is None and gpu_budget + cpu_budget < need and default_disk is not None:
        disk_dir = default_disk
    disk_budget = 0
    if disk_dir is not None:
        disk_budget = disk_mem if disk_mem is not None else machine_budgets(device, weights, disk_dir)[2]
    index_bytes = host_index = host_landmarks = 0
    if policy == "shadowkv":  # its index (low-rank keys, landmarks) lives on the GPU before any page does
        from .policies.shadowkv import host_part_bytes, index_on_host, plan_bytes

        index_bytes, step_bytes = plan_bytes(args, ctx_tokens, elt)
        if device.type == "cuda" and index_on_host(args, ctx_tokens, elt, gpu_budget):
            # U and the landmarks go to pinned CPU memory, read in place (ShadowKVConfig.index_tier)
            host_u, host_landmarks = host_part_bytes(args, ctx_tokens, elt)
            host_index = host_u + host_landmarks
            index_bytes -= host_index
            cpu_budget -= host_index
        if index_bytes > gpu_budget or cpu_budget < 0:
            raise ContextOverflowError(
                f"the shadowkv index of a {format_tokens(ctx_tokens)}-token context needs "
                f"{format_bytes(index_bytes)} of GPU memory and {format_bytes(host_index)} of CPU memory, more "
                f"than the {format_bytes(gpu_budget)} / {format_bytes(cpu_budget + host_index)} there is")
        gpu_budget -= index_bytes

    plan = Plan(model=model, ctx_tokens=ctx_tokens, policy=policy, kv_dtype=str(kv_dtype).removeprefix("torch."),
                kv_bytes_per_token=per_token, weights_bytes=weights, device=str(device),
                disk_dir=str(disk_dir) if disk_dir else None)
    plan.gpu.budget, plan.cpu.budget, plan.disk.budget = gpu_budget, cpu_budget, disk_budget
    if policy == "shadowkv":
        plan.index_tier = "cpu" if host_index else "gpu"
    total = gpu_budget + cpu_budget + disk_budget
    if need > total:
        where = ", ".join(f"{n} {format_bytes(b)}" for n, b in (("GPU", gpu_budget), ("CPU", cpu_budget),
                                                                ("disk", disk_budget)))
        hint = "" if disk_dir else "; add a --disk DIR on a drive with room"
        if policy == "shadowkv" and parts == 2 and need // 2 <= total:
            hint += "; or --policy-opt exact_keys=false, which stores values only (half the bytes)"
        raise ContextOverflowError(
            f"a {format_tokens(ctx_tokens)}-token context needs {format_bytes(need)} of KV "
            f"({format_bytes(per_token)}/token), more than every tier together can hold ({where}){hint}")
    left = ctx_tokens
    tiers = ((plan.gpu, gpu_budget), (plan.cpu, cpu_budget), (plan.disk, disk_budget))
    gpu_values = False
    if policy == "shadowkv" and parts == 2:
        from .policies.shadowkv import values_on_gpu

        gpu_values = values_on_gpu(need, gpu_budget, cpu_budget)
    if gpu_values:   # the GPU tier caches the newest values; every token's K and V live below it
        plan.gpu.tokens = min(ctx_tokens, gpu_budget // (per_token // 2))
        plan.gpu.bytes = plan.gpu.tokens * (per_token // 2)
        tiers = tiers[1:]
    for tier, budget in tiers:
        tier.tokens = min(left, budget // per_token)
        tier.bytes = tier.tokens * per_token
        left -= tier.tokens
    plan.tiered = (gpu_values or plan.gpu.tokens < ctx_tokens
                   or gpu_mem is not None or cpu_mem is not None or disk is not None)
    offload_s = plan.cpu.bytes / bw.h2d + plan.disk.bytes / bw.disk if device.type == "cuda" else plan.disk.bytes / bw.disk
    plan.ms_per_token = 1e3 * (weights / bw.hbm + plan.gpu.bytes / bw.hbm + offload_s)
    if policy == "shadowkv":
        link = bw.h2d if plan.gpu.tokens < ctx_tokens and device.type == "cuda" else bw.hbm
        host_step = host_landmarks / bw.h2d     # a host index: every landmark crosses PCIe each step
        plan.ms_per_token = 1e3 * (weights / bw.hbm + index_bytes / 8 / bw.hbm + step_bytes / link + host_step)
        where = (f"on the GPU and {format_bytes(host_index)} (low-rank keys, landmarks) in pinned CPU memory, "
                 f"read over PCIe each step" if host_index else "on the GPU (low-rank keys, landmarks)")
        plan.notes.append(f"shadowkv keeps {format_bytes(index_bytes)} of index {where}, and reads "
                          f"{format_bytes(step_bytes)} of values a step at full context "
                          f"(fewer with chunks reused from the step before)")
        if gpu_values:
            plan.notes.append(f"shadowkv's GPU tier caches the values of the newest {plan.gpu.tokens:,} tokens, "
                              "which is all a decode step reads from the store; every token's K and V live in "
                              "CPU memory")
        if parts == 1:
            plan.notes.append("shadowkv with exact_keys=False stores values only (keys come from its low-rank "
                              "index): half the KV bytes, no session save, truncation only within the recent window")
    if ctx_tokens > args.max_seq_len:
        plan.notes.append(f"the model was trained on {args.max_seq_len:,} tokens; past that its answers may degrade")
    return plan
