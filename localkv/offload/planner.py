"""The placement planner: for a model, a context and a machine, how many tokens each tier holds.

Inputs are the model's dimensions, the context, the KV dtype, the user's budgets (``--gpu-mem``,
``--cpu-mem``, ``--disk``) and what the machine has free (`machine.machine_budgets`). The policy is asked,
through the registry, what it keeps besides the store's pages (`Policy.footprint`: an index, buffers); that is
placed first, then the pages fill the tiers fastest first. The estimate of ms/token is the time to stream the
weights once from GPU memory plus the bytes the policy says a step reads per link (`Policy.estimate`; for exact
attention every offloaded KV byte once over PCIe or from disk: the two overlap with compute but not with each
other on a typical PC's single PCIe link to the GPU); scattered disk reads cost their count (`StepBytes.disk_reads`)
where that is more than their bytes. When the context fits no tier combination the planner
refuses with a ContextOverflowError that says by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ContextOverflowError
from ..models.args import ModelArgs
from ..units import format_bytes, format_tokens
from . import policies
from .machine import DISK_SHARE, GPU_HEADROOM_BYTES, RAM_SHARE, machine_budgets  # noqa: F401 (re-exported)


@dataclass
class Bandwidths:
    """Bytes per second the estimate assumes (measured ones replace these: ``localkv bench``)."""

    hbm: float = 1.0e12    # a gaming GPU (RTX 4090 ~1 TB/s)
    h2d: float = 25e9      # PCIe 4.0 x16, pinned
    disk: float = 3e9      # a PCIe 4.0 NVMe, random 1 MiB reads
    disk_reads: float = 40e3
    """Scattered small reads (4 KB) a second: the GPU machine's disk served LeoAM's ~16,000 a step at 1M in
    389 ms with 4 in flight (docs/benchmarks.md); a sparse step's disk time is its reads, not its bytes."""


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
    policy_options: dict[str, Any] = field(default_factory=dict)
    """Choices the placement made for the policy (`Footprint.options`), passed to its cache."""
    how: str = ""
    """What the estimate counts, one line."""
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
        rows += ["", f"expected decode at full context: ~{self.ms_per_token:,.0f} ms/token ({self.how})"]
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(args: ModelArgs, ctx_tokens: int, *, model: str = "model", policy: str = policies.DEFAULT,
              device: torch.device | str = "cpu", kv_dtype: torch.dtype = torch.bfloat16,
              weights_bytes: int | None = None, gpu_mem: int | None = None, cpu_mem: int | None = None,
              disk: Path | str | None = None, disk_mem: int | None = None, default_disk: Path | None = None,
              bandwidths: Bandwidths | None = None, options: dict | None = None) -> Plan:
    """Decide the tiers for ``ctx_tokens`` of KV; raises ContextOverflowError when it cannot fit.

    Budgets given by the user are used as they are; the others come from the machine. A disk tier is used
    when the user names ``disk``, or when GPU and CPU cannot hold the context and ``default_disk`` is given.
    ``options`` are the policy's (``make_cache(..., **options)``); the policy says what they change
    (`Policy.store_parts`, `Policy.footprint`). Nothing is created on disk: a refusal leaves no trace.
    """
    spec = policies.get(policy)
    options = dict(options or {})
    spec.parse(options)
    device = torch.device(device)
    bw = bandwidths or Bandwidths()
    elt = torch.empty((), dtype=kv_dtype).element_size()
    per_token = spec.store_parts(options) * args.n_layers * args.n_kv_heads * args.head_dim * elt
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

    # What the policy keeps besides the pages (an index, buffers) goes first.
    inputs = policies.PlanInputs(args, ctx_tokens, kv_dtype, device, gpu_budget, cpu_budget, disk_budget, need,
                                 options)
    fp = spec.footprint(inputs)
    if fp.gpu_bytes > gpu_budget or fp.cpu_bytes > cpu_budget:
        raise ContextOverflowError(
            f"the {policy} {fp.what} of a {format_tokens(ctx_tokens)}-token context needs "
            f"{format_bytes(fp.gpu_bytes)} of GPU memory and {format_bytes(fp.cpu_bytes)} of CPU memory, more "
            f"than the {format_bytes(gpu_budget)} / {format_bytes(cpu_budget)} there is")
    gpu_budget -= fp.gpu_bytes
    cpu_budget -= fp.cpu_bytes

    plan = Plan(model=model, ctx_tokens=ctx_tokens, policy=policy, kv_dtype=str(kv_dtype).removeprefix("torch."),
                kv_bytes_per_token=per_token, weights_bytes=weights, device=str(device),
                disk_dir=str(disk_dir) if disk_dir else None, policy_options=dict(fp.options))
    plan.gpu.budget, plan.cpu.budget, plan.disk.budget = gpu_budget, cpu_budget, disk_budget
    total = gpu_budget + cpu_budget + disk_budget / fp.disk_ratio   # in bytes of KV as it is in memory
    if need > total:
        where = ", ".join(f"{n} {format_bytes(b)}" for n, b in (("GPU", gpu_budget), ("CPU", cpu_budget),
                                                                ("disk", disk_budget)))
        hint = ("" if disk_dir else "; add a --disk DIR on a drive with room") + fp.overflow_hint
        raise ContextOverflowError(
            f"a {format_tokens(ctx_tokens)}-token context needs {format_bytes(need)} of KV "
            f"({format_bytes(per_token)}/token), more than every tier together can hold ({where}){hint}")
    left = ctx_tokens
    tiers = ((plan.gpu, gpu_budget), (plan.cpu, cpu_budget), (plan.disk, disk_budget))
    if fp.gpu_values:   # the GPU tier caches the newest values; every token's K and V live below it
        plan.gpu.tokens = min(ctx_tokens, gpu_budget // (per_token // 2))
        plan.gpu.bytes = plan.gpu.tokens * (per_token // 2)
        tiers = tiers[1:]
    for tier, budget in tiers:
        size = per_token * (fp.disk_ratio if tier is plan.disk else 1)   # a page's bytes there
        tier.tokens = min(left, int(budget // size))
        tier.bytes = int(tier.tokens * size)
        left -= tier.tokens
    plan.tiered = (fp.gpu_values or plan.gpu.tokens < ctx_tokens
                   or gpu_mem is not None or cpu_mem is not None or disk is not None)
    step = spec.estimate(inputs, fp, plan)
    disk_s = max(step.disk / bw.disk, step.disk_reads / bw.disk_reads)
    plan.ms_per_token = 1e3 * (weights / bw.hbm + step.hbm / bw.hbm + step.h2d / bw.h2d + disk_s)
    plan.how = step.how
    plan.notes += step.notes
    if ctx_tokens > args.max_seq_len:
        plan.notes.append(f"the model was trained on {args.max_seq_len:,} tokens; past that its answers may degrade")
    return plan
