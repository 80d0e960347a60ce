"""Probe (development aid): where a tiered chunked prefill spends its time on the GPU (torch profiler)."""
import torch
from torch.profiler import ProfilerActivity, profile

from localkv.bench.model import random_model
from localkv.bench.shapes import shape_args
from localkv.offload import make_cache
from localkv.offload.store import Budgets

args = shape_args("llama3-8b")
model = random_model(args, "cuda", torch.bfloat16)
torch.cuda.set_per_process_memory_fraction(24 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
n, chunk = 65536, 16384
ids = torch.randint(0, args.vocab_size, (n,), device="cuda")
cache = make_cache("exact", args, n, device="cuda", dtype=torch.bfloat16,
                   budgets=Budgets(2 * 2**30, 12 * 2**30, None))
with torch.inference_mode():
    for s in range(0, n, chunk):  # warm: pins the CPU arenas
        model(ids[s:s + chunk], cache)
    cache.truncate(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s in range(0, n, chunk):
            model(ids[s:s + chunk], cache)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
