"""One benchmark run: for each context and policy (and peer), fill the KV, time decode, set it against its floor.

    config = BenchConfig(ctxs=[32768], shape="llama3-8b", synthetic_kv=True)
    result = run_bench(config, progress=print)     # {"meta", "ceilings", "rows"}: what report.py prints

Everything is decided before anything slow starts: the shape or model's dimensions, the policies, the tier
plan of every context (a context past every tier fails here, as ``localkv plan`` fails), the disk directory.
Then, in this order: the ceilings, the model, and the rows. Each row's cache lives only for that row.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ContextOverflowError, UserError
from ..models.args import ModelArgs
from ..models.loader import LoadedModel
from ..offload.planner import GPU_HEADROOM_BYTES, Plan, make_plan
from ..offload import policies as registry
from ..offload.store import Budgets
from ..runtime import Engine
from ..units import format_tokens
from .ceilings import Ceilings, measure_ceilings
from .measure import OOM, by_kind, decode_times, sync, timed_prefill
from .model import random_model, weights_bytes
from .needles import Needles
from .peer_hf import PEER_CACHES, hf_model, peer_row
from .rows import failed_row, kv_bytes_per_token, make_row, moved_bytes, moved_per_token, peak_bytes, plain, tier_tokens
from .shapes import shape_args
from .synthetic import synth_fill

PEERS = ("hf",)


@dataclass
class BenchConfig:
    """What ``localkv bench`` measures."""

    ctxs: list[int]
    """Context sizes in tokens."""
    policies: list[str] = field(default_factory=lambda: [registry.DEFAULT])
    model: str | None = None
    """A real model (embedded name, GGUF file, HF directory); None with no ``shape``: the embedded default."""
    shape: str | None = None
    """A named architecture (``shapes.SHAPES``) with random weights, instead of ``model``."""
    budgets: list[tuple[str, int | float]] = field(default_factory=list)
    """(as typed, value) pairs passed as ``budget=`` to every sparse policy, one row each."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options passed to every sparse policy (``--policy-opt``), e.g. ``{"budget": 1/16}``; a key ``policy.name``
    goes to that policy only (`policies.scoped`)."""
    gpu_mem: int | None = None
    cpu_mem: int | None = None
    gpu_cap: int | None = None
    """Cap on this process's GPU memory, bytes (a gaming card on a data-centre GPU)."""
    disk: Path | None = None
    peers: list[str] = field(default_factory=list)
    synthetic_kv: bool = False
    steps: int = 32
    warmup: int = 3
    prefill_chunk: int | None = None
    device: str | None = None
    dtype: str | None = None


@dataclass
class Variant:
    """A policy with its options: one line of the plot."""

    policy: str
    options: dict[str, Any]
    label: str


def variants(config: BenchConfig) -> list[Variant]:
    out = []
    for policy in config.policies:
        if not registry.get(policy).sparse:
            out.append(Variant(policy, {}, policy))
            continue
        options = registry.scoped(config.options, policy)
        label = " ".join([policy] + [f"{k}={v}" for k, v in options.items()])
        if not config.budgets:
            out.append(Variant(policy, options, label))
        else:
            out += [Variant(policy, {**options, "budget": value}, f"{label} budget={text}")
                    for text, value in config.budgets]
    return out


def _plans(config: BenchConfig, args: ModelArgs, source: str, device: torch.device, dtype: torch.dtype,
           names: list[str]) -> dict[tuple[int, str], Plan]:
    """The tier plan of every (context, policy), as `localkv.load` makes it: a policy's plan counts what it keeps
    on the GPU besides pages (an index) and decides where that goes. Peers' rows use the reference's."""
    weights = args.n_params() * dtype.itemsize
    gpu_mem = config.gpu_mem
    if gpu_mem is None and config.gpu_cap is not None and device.type == "cuda":
        gpu_mem = max(0, config.gpu_cap - weights - GPU_HEADROOM_BYTES)
    extra = config.warmup + config.steps + 1  # decode appends these after the context
    user_tiers = config.gpu_mem is not None or config.cpu_mem is not None or config.disk is not None
    plans = {}
    for n in config.ctxs:
        for policy in dict.fromkeys([registry.REFERENCE, *names]):
            try:
                plan = make_plan(args, n + extra, model=source, policy=policy, device=device, kv_dtype=dtype,
                                 weights_bytes=weights, gpu_mem=gpu_mem, cpu_mem=config.cpu_mem, disk=config.disk,
                                 options=registry.scoped(config.options, policy) if registry.get(policy).sparse
                                 else None)
            except ContextOverflowError as e:
                if policy == registry.REFERENCE and registry.REFERENCE not in names:
                    continue   # planned only for the peers' rows, which then say the context does not fit
                raise ContextOverflowError(
                    f"--ctx {format_tokens(n)} (+{extra} decoded tokens), {policy}: {e}") from None
            if not user_tiers and plan.gpu.tokens >= n + extra:
                plan.tiered = False  # fits under the cap: the all-on-device path, as `localkv run` takes it
            plans[n, policy] = plan
    return plans


def _budgets(plan: Plan) -> Budgets | None:
    if not plan.tiered:
        return None  # the whole context fits in device memory: the fast path, as ``localkv.load`` takes it
    return Budgets(plan.gpu.budget, plan.cpu.budget, Path(plan.disk_dir) if plan.disk_dir else None,
                   plan.disk.budget or None)


def _chunk(config: BenchConfig, device: torch.device) -> int:
    return config.prefill_chunk or (4096 if device.type == "cuda" else 512)  # the engine's defaults


def _release(device: torch.device) -> None:
    """Give back what the last row held: device memory, and the pinned host memory torch keeps cached for reuse
    (a 1M-token row pins ~140 GB; the next row's arenas have other sizes and would not fit beside it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        accelerator = getattr(torch, "accelerator", None)
        empty_host = (getattr(accelerator, "empty_host_cache", None)            # torch >= 2.13
                      or getattr(torch._C, "_host_emptyCache", None))          # older torch
        if empty_host is not None:
            empty_host()
        torch.cuda.reset_peak_memory_stats(device)


def run_policy(loaded: LoadedModel, variant: Variant, ctx: int, plan: Plan, config: BenchConfig,
               ceilings: Ceilings, progress: Callable[[str], None]) -> dict:
    """Fill ``ctx`` tokens under one policy and its plan, decode ``warmup`` then ``steps`` tokens; the row."""
    model = loaded.model
    args, device, dtype = model.args, model.device, model.dtype
    options = {**plan.policy_options, **variant.options}   # the planner's choices, as `localkv.load` passes them
    engine = Engine(loaded, ctx_tokens=ctx + config.warmup + config.steps + 1, policy=variant.policy,
                    prefill_chunk=_chunk(config, device), budgets=_budgets(plan), kv_dtype=dtype, **options)
    seq = engine.new_sequence()
    try:
        prefill_s, needles, fill_s = None, None, None
        if config.synthetic_kv:
            needles = Needles.make(model, ctx, position=ctx + config.warmup + config.steps)
            fill_s = synth_fill(seq.cache, args, ctx, device=device, dtype=dtype, needles=needles, progress=progress)
        else:
            prefill_s = timed_prefill(engine, seq, ctx, progress)
        decode_times(engine, seq, config.warmup)
        before = moved_bytes(seq.cache.stats())
        kinds: list = []
        times = decode_times(engine, seq, config.steps, kinds)
        stats = seq.cache.stats()
        recall = needles.recall(model, seq.cache) if needles is not None else None
    except OOM:
        return failed_row(variant.label, ctx, "OOM")
    finally:
        del seq
    extra = {"policy": variant.policy, "options": plain(variant.options), "peak_bytes": peak_bytes(stats),
             "moved_bytes_per_token": moved_per_token(before, moved_bytes(stats), config.steps),
             "hit_rate": stats.get("hit_rate"), "needle_recall": recall, "fill_s": fill_s, "stats": plain(stats),
             "decode_ms_by_kind": by_kind(times, kinds)}
    if device.type == "cuda":
        extra["gpu_allocated_peak"] = torch.cuda.max_memory_allocated(device)
    return make_row(variant.label, ctx, "synthesized" if config.synthetic_kv else "prefill", prefill_s, times,
                    tier_tokens(stats), kv_bytes_per_token(args, dtype), weights_bytes(model), ceilings, **extra)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _tiers(plan: Plan) -> str:
    where = [f"{name} {format_tokens(t.tokens)}" for name, t in (("GPU", plan.gpu), ("CPU", plan.cpu),
                                                                 ("disk", plan.disk)) if t.tokens]
    return ", ".join(where) + ("" if plan.tiered else " (all on the device, untiered)")


def _guarded(label: str, ctx: int, progress: Callable[[str], None], run: Callable[[], dict]) -> dict:
    """A row, or a failed row saying why: one broken policy does not lose a long run's other rows."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - reported in the row and on stderr
        progress(f"  {label} at {ctx:,} tokens failed: {type(e).__name__}: {e}")
        return failed_row(label, ctx, f"failed: {type(e).__name__}")


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda _: None,
              checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run every context × policy (and peer) of ``config``; returns ``{"meta", "ceilings", "rows"}``.

    Raises UserError before any slow step for bad input: an unknown shape or policy, a context past every
    tier, an unwritable disk directory, a peer that is not installed. A row that fails later is reported as
    failed and the run goes on; ``checkpoint`` gets the result so far after each row.
    """
    from ..models.loader import default_dtype, load_model, parse_device, parse_dtype, read_model_args
    from ..offload.disk import check_writable

    if config.steps < 1 or config.warmup < 0:
        raise UserError(f"--steps must be positive and --warmup not negative (got {config.steps}, {config.warmup})")
    device = parse_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the memory-cap call wants an index
    dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(device)
    if config.shape:
        args, source = shape_args(config.shape), f"{config.shape} shape, random weights"
    else:
        args, path, _, _ = read_model_args(config.model)
        source = path.name
    todo = variants(config)
    for peer in config.peers:
        if peer not in PEERS:
            raise UserError(f"unknown peer {peer!r} (available: {', '.join(PEERS)})")
    if config.peers:
        try:
            import transformers
        except ImportError:
            raise UserError("--peer hf needs transformers (pip install transformers)") from None
    if config.disk is not None:
        check_writable(config.disk)
    plans = _plans(config, args, source, device, dtype, [v.policy for v in todo])

    progress("measuring the machine's ceilings")
    ceilings = measure_ceilings(device, config.disk)
    if device.type == "cuda" and config.gpu_cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.gpu_cap / total), device)
    dtype_name = str(dtype).removeprefix("torch.")
    progress(f"building the model ({source}, {args.n_params() / 1e9:.2f}B parameters, {dtype_name})")
    if config.shape:
        loaded = LoadedModel(args, random_model(args, device, dtype), None, None, Path(config.shape), "random")
    else:
        loaded = load_model(config.model, device=device, dtype=dtype)
    model = loaded.model
    hf = None
    if config.peers:
        hf = hf_model(model)
    meta = {"model": source, "device": _device_name(device), "torch": torch.__version__,
            "transformers": transformers.__version__ if config.peers else None,
            "date": time.strftime("%Y-%m-%d %H:%M"), "dtype": dtype_name,
            "weights_bytes": weights_bytes(model),
            "kv_bytes_per_token": kv_bytes_per_token(args, dtype),
            "steps": config.steps, "warmup": config.warmup, "synthetic_kv": config.synthetic_kv,
            "gpu_cap_bytes": config.gpu_cap, "tiers": {f"{n} {policy}": _tiers(p) for (n, policy), p in plans.items()}}
    result = {"meta": meta, "ceilings": ceilings.to_dict(), "rows": []}
    _release(device)  # the ceilings' buffers are not the rows' peak

    def record(label: str, ctx: int, plan: Plan, run: Callable[[], dict]) -> None:
        progress(f"{label} at {ctx:,} tokens ({_tiers(plan)})")
        result["rows"].append(_guarded(label, ctx, progress, run))
        _release(device)
        if checkpoint is not None:
            checkpoint(result)

    for ctx in config.ctxs:
        for v in todo:
            plan = plans[ctx, v.policy]
            record(v.label, ctx, plan, lambda: run_policy(loaded, v, ctx, plan, config, ceilings, progress))
        for kind in PEER_CACHES if hf is not None else ():
            if (ctx, registry.REFERENCE) not in plans:
                result["rows"].append(failed_row(f"hf {kind}", ctx, "n/a (past every tier)"))
                continue
            record(f"hf {kind}", ctx, plans[ctx, registry.REFERENCE], lambda: peer_row(
                hf, kind, model, ctx, synthetic=config.synthetic_kv, warmup=config.warmup, steps=config.steps,
                chunk=_chunk(config, device), ceilings=ceilings))
    sync(device)
    return result
