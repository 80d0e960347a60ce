"""The tiered KV store on the GPU machine: exact decode and chunked prefill against their floors and peers.

    python scripts/bench_store.py [--ctx 32K,128K] [--gpu-cap-gb 24] [--stages all]

Llama-3.1-8B shape, random bf16 weights, GPU memory capped at ``--gpu-cap-gb`` (a gaming card). KV is
synthesized straight into the tiers (random pages: speed does not depend on their values) where a real
prefill would take too long; the prefill stage runs a real 128K prefill. In one run:

  ceilings   HBM copy, pinned host->device, disk read (O_DIRECT preadv threads, and aiofiles)
  decode     exact policy, KV in the pinned CPU tier, ms/token at each context, against Hugging Face
             transformers' offloaded DynamicCache (the OffloadedCache) on the same weights, and against the
             PCIe floor (offloaded KV bytes / measured pinned H2D) plus the weight-streaming floor
  prefill    chunked prefill over the tiers at the largest context, tokens/s, against one plain all-on-GPU
             SDPA forward of the same model (memory cap lifted for the baseline only)
  disk       decode with the CPU tier capped so most pages come from disk, against the disk read floor

Prints a table last; writes JSON to $OUT/bench_store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from localkv.bench.ceilings import copy_rate, h2d_rate, median_seconds
from localkv.bench.model import random_model
from localkv.bench.shapes import shape_args
from localkv.bench.synthetic import synth_fill
from localkv.models.llama import Transformer
from localkv.offload import make_cache
from localkv.offload.store import Budgets
from localkv.units import parse_tokens

GB = 1e9
RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def gpu_time(fn, warmup: int = 1, repeat: int = 5) -> float:
    """Median seconds of fn() measured with CUDA events."""
    return median_seconds(fn, True, repeat, warmup)


# -- ceilings ---------------------------------------------------------------------------------------------
def ceilings(disk_dir: Path) -> dict:
    hbm, h2d = copy_rate(2 * 2**30, "cuda"), h2d_rate(2 * 2**30)
    h = torch.empty(2 * 2**30, dtype=torch.uint8, pin_memory=True)  # the disk reads land here
    # Disk: a 2 GiB file, read back with O_DIRECT preadv from 8 threads into the pinned buffer, 1 MiB requests.
    from concurrent.futures import ThreadPoolExecutor

    path = disk_dir / "ceiling.bin"
    size, req = 2 * 2**30, 2**20
    with open(path, "wb") as f:
        for _ in range(size // (64 * 2**20)):
            f.write(os.urandom(64 * 2**20))
        os.fsync(f.fileno())
    view = memoryview(h.numpy())
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))

    def read(i):
        return os.preadv(fd, [view[i * req:(i + 1) * req]], i * req)

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        total = sum(pool.map(read, range(size // req)))
    disk_preadv = total / (time.perf_counter() - t)
    os.close(fd)
    disk_aiofiles = None
    try:
        import aiofiles

        async def aio():
            sem = asyncio.Semaphore(8)

            async def one(i):
                async with sem:
                    async with aiofiles.open(path, "rb", buffering=0) as f:
                        await f.seek(i * req)
                        data = await f.read(req)
                        view[i * req:i * req + len(data)] = data
                        return len(data)

            return sum(await asyncio.gather(*(one(i) for i in range(size // req))))

        os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        total = asyncio.run(aio())
        disk_aiofiles = total / (time.perf_counter() - t)
    except ImportError:
        pass
    path.unlink()
    del h
    return {"hbm_copy_GBps": hbm / GB, "h2d_pinned_GBps": h2d / GB, "disk_preadv_GBps": disk_preadv / GB,
            "disk_aiofiles_GBps": disk_aiofiles / GB if disk_aiofiles else None}


@torch.inference_mode()
def decode_ms(model, cache, steps: int) -> float:
    tok = torch.tensor([1], device="cuda")
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(tok, cache, decode=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cache.truncate(cache.length - 1)  # keep the context fixed
    return 1e3 * statistics.median(times[1:])


@torch.inference_mode()
def hf_offloaded_ms(model: Transformer, n_tokens: int, steps: int) -> float | None:
    """transformers' offloaded DynamicCache on the same weights, its context growing a token a step as in a chat.

    (Cutting the cache back to ``n_tokens`` after each step would leave views that are not contiguous, so every
    prefetch would first copy them on the CPU, and transformers would measure 3-4x slower than it is.)"""
    try:
        import transformers
    except ImportError:
        return None
    from localkv.bench.peer_hf import hf_decode_times, hf_fill, hf_model

    hf = hf_model(model)
    cache, _ = hf_fill(hf, n_tokens, offloaded=True, synthetic=True, chunk=8192)
    hf_decode_times(hf, cache, 1)
    ms = 1e3 * statistics.median(hf_decode_times(hf, cache, steps))
    del cache, hf
    torch.cuda.empty_cache()
    log(f"  transformers {transformers.__version__} offloaded cache: {ms:.0f} ms/token")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="32K,128K")
    ap.add_argument("--gpu-cap-gb", type=float, default=24)
    ap.add_argument("--stages", default="ceilings,decode,decode_gpu,hf,prefill,disk")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--block-pages", type=int, default=64)
    ap.add_argument("--ring-blocks", type=int, default=4)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_store.py measures the GPU machine: no CUDA device here")
    stages = set(a.stages.split(","))
    ctxs = [parse_tokens(c) for c in a.ctx.split(",")]
    disk_dir = Path(a.disk_dir or tempfile.mkdtemp(prefix="localkv-bench-"))
    out_dir = Path(os.environ.get("OUT", "."))
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__, cap_gb=a.gpu_cap_gb,
                   date=time.strftime("%Y-%m-%d"), command="python scripts/bench_store.py " + " ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None))

    def save():
        (out_dir / "bench_store.json").write_text(json.dumps(RESULTS, indent=2))

    if "ceilings" in stages:
        RESULTS["ceilings"] = ceilings(disk_dir)
        log(f"ceilings: {RESULTS['ceilings']}")
        save()
    c = RESULTS.get("ceilings", {"hbm_copy_GBps": 2773, "h2d_pinned_GBps": 47.3, "disk_preadv_GBps": 1.0})

    args = shape_args("llama3-8b")
    model = random_model(args, "cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Weight streaming: every weight read once per token at the memory's traffic rate (the copy's read+write).
    weights_floor_ms = 1e3 * weight_bytes / (c["hbm_copy_GBps"] * GB)
    RESULTS["weights_GB"] = weight_bytes / GB
    RESULTS["weights_floor_ms"] = weights_floor_ms
    cap = a.gpu_cap_gb * 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    kv_per_token = args.kv_bytes_per_token

    if "decode" in stages:  # the model alone: 16 tokens of KV, in memory
        with torch.inference_mode():
            small = make_cache("exact", args, 64)
            model(torch.arange(16, device="cuda"), small)
        RESULTS["decode_base_ms"] = decode_ms(model, small, a.steps)
        del small
        log(f"decode with 16 tokens of KV: {RESULTS['decode_base_ms']:.1f} ms (weight floor {weights_floor_ms:.1f})")
        rows = []
        for n in ctxs:
            budgets = Budgets(0, int(kv_per_token * n * 1.05) + 2**30, None)
            opts = dict(block_pages=a.block_pages, ring_blocks=a.ring_blocks)
            cache = make_cache("exact", args, n + 64, device="cuda", dtype=torch.bfloat16, budgets=budgets, **opts)
            synth_fill(cache, args, n, device="cuda", dtype=torch.bfloat16)
            ms = decode_ms(model, cache, a.steps)
            stats = cache.stats()
            del cache
            torch.cuda.empty_cache()
            gpu_ms = None
            fits = kv_per_token * n * 1.1 < cap - torch.cuda.memory_allocated() - 2 * 2**30
            if "decode_gpu" in stages and fits:  # the same context wholly in the GPU tier: the compute alone
                cache = make_cache("exact", args, n + 64, device="cuda", dtype=torch.bfloat16,
                                   budgets=Budgets(int(kv_per_token * n * 1.05), 0, None), **opts)
                synth_fill(cache, args, n, device="cuda", dtype=torch.bfloat16)
                gpu_ms = decode_ms(model, cache, a.steps)
                del cache
                torch.cuda.empty_cache()
            floor = weights_floor_ms + 1e3 * kv_per_token * n / (c["h2d_pinned_GBps"] * GB)
            hf = hf_offloaded_ms(model, n, min(a.steps, 3)) if "hf" in stages else None
            rows.append({"ctx": n, "localkv_ms": ms, "pcie_floor_ms": floor, "hf_offloaded_ms": hf,
                         "localkv_gpu_tier_ms": gpu_ms,
                         "h2d_bytes_per_token": stats["moved_bytes"]["h2d"] / (a.steps + 1)})
            log(f"decode {n}: localkv {ms:.0f} ms (all on GPU: {gpu_ms}), floor {floor:.0f} ms, HF offloaded {hf}")
            RESULTS["decode_cpu_tier"] = rows
            save()

    if "prefill" in stages:
        n = max(ctxs)
        ids = torch.randint(0, args.vocab_size, (n,), device="cuda")
        torch.cuda.set_per_process_memory_fraction(1.0)  # the baseline holds all KV on the GPU
        with torch.inference_mode():
            full = make_cache("exact", args, n)
            t = gpu_time(lambda: (full.truncate(0), model(ids, full)), warmup=0, repeat=1)
        del full
        gc.collect()
        torch.cuda.empty_cache()
        base = n / t
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
        free = cap - torch.cuda.memory_allocated()
        budgets = Budgets(int(max(0, free - 6 * 2**30)), int(kv_per_token * n * 1.05), None)
        with torch.inference_mode():
            tiered = make_cache("exact", args, n, device="cuda", dtype=torch.bfloat16, budgets=budgets)

            def chunked():
                tiered.truncate(0)
                for s in range(0, n, a.prefill_chunk):
                    model(ids[s:s + a.prefill_chunk], tiered)

            # One pass first: it pins the CPU tier's arenas (a one-time cost per process, like loading weights).
            t = gpu_time(chunked, warmup=1, repeat=1)
        stats = tiered.stats()
        del tiered
        torch.cuda.empty_cache()
        RESULTS["prefill"] = {"ctx": n, "plain_gpu_tok_s": base, "localkv_tiered_tok_s": n / t,
                              "gpu_tokens": stats["gpu_tokens"], "cpu_tokens": stats["cpu_tokens"],
                              "chunk": a.prefill_chunk}
        log(f"prefill {n}: plain {base:.0f} tok/s, tiered {n / t:.0f} tok/s")
        save()

    if "disk" in stages:
        n = max(ctxs)
        cpu_bytes = 2 * 2**30
        budgets = Budgets(0, cpu_bytes, disk_dir)
        with torch.inference_mode():
            cache = make_cache("exact", args, n + 64, device="cuda", dtype=torch.bfloat16, budgets=budgets)
            synth_fill(cache, args, n, device="cuda", dtype=torch.bfloat16)
            ms = decode_ms(model, cache, 2)
        stats = cache.stats()
        disk_bytes = stats["disk_bytes"]
        floor = 1e3 * disk_bytes / (c["disk_preadv_GBps"] * GB)
        RESULTS["decode_disk_tier"] = {"ctx": n, "localkv_ms": ms, "disk_floor_ms": floor, "disk_GB": disk_bytes / GB,
                                       "cpu_GB": stats["cpu_bytes"] / GB}
        log(f"disk decode {n}: {ms:.0f} ms, floor {floor:.0f} ms")
        del cache
        save()

    # -- the table --------------------------------------------------------------------------------------
    print(f"\n{RESULTS['device']}, GPU capped at {a.gpu_cap_gb:g} GB, Llama-3.1-8B shape, bf16, {RESULTS['date']}")
    if "ceilings" in RESULTS:
        cc = RESULTS["ceilings"]
        print(f"ceilings: HBM copy {cc['hbm_copy_GBps']:.0f} GB/s | pinned H2D {cc['h2d_pinned_GBps']:.1f} GB/s | "
              f"disk preadv {cc['disk_preadv_GBps']:.2f} GB/s | disk aiofiles {cc['disk_aiofiles_GBps'] or 0:.2f} GB/s")
    print(f"weights {RESULTS['weights_GB']:.1f} GB, weight-streaming floor {weights_floor_ms:.1f} ms/token; "
          f"decode with 16 tokens of KV {RESULTS.get('decode_base_ms', float('nan')):.1f} ms/token")
    for r in RESULTS.get("decode_cpu_tier", []):
        hf = r["hf_offloaded_ms"]
        print(f"decode {r['ctx']:>7}: localkv {r['localkv_ms']:7.0f} ms | PCIe floor {r['pcie_floor_ms']:6.0f} ms "
              f"({r['localkv_ms'] / r['pcie_floor_ms']:.2f}x) | HF offloaded {hf or float('nan'):7.0f} ms "
              f"({(hf or float('nan')) / r['localkv_ms']:.1f}x slower) | all KV on GPU "
              f"{r['localkv_gpu_tier_ms'] or float('nan'):5.0f} ms")
    if "prefill" in RESULTS:
        p = RESULTS["prefill"]
        print(f"prefill {p['ctx']:>6}: tiered {p['localkv_tiered_tok_s']:.0f} tok/s vs plain GPU SDPA "
              f"{p['plain_gpu_tok_s']:.0f} tok/s ({p['localkv_tiered_tok_s'] / p['plain_gpu_tok_s']:.2f}x)")
    if "decode_disk_tier" in RESULTS:
        d = RESULTS["decode_disk_tier"]
        print(f"disk decode {d['ctx']}: {d['localkv_ms']:.0f} ms vs disk floor {d['disk_floor_ms']:.0f} ms "
              f"({d['localkv_ms'] / d['disk_floor_ms']:.2f}x), {d['disk_GB']:.1f} GB from disk")
    save()


if __name__ == "__main__":
    main()
