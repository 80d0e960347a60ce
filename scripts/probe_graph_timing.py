"""Probe (development aid): what a graphed op's time per call owes to the timing method, on one GPU.

    python scripts/probe_graph_timing.py        # about 10 s on an H100

Times landmark scoring at 16K chunks (128K tokens, 34 MB a call) and a plain device copy of the same 34 MB four
ways: graphs of 8 or 64 calls (rotating over eight buffers, more than L2 holds), each replayed on an idle GPU or
behind a sleep kernel that keeps the GPU busy while the host queues the graph. Rounds interleave the methods; the
table gives each one's median over the rounds and its share of the copy rate measured in the same run.
bench_kernels.py times with 64 calls behind a sleep; the copy row shows how much of a figure is the method's, on
an op with no grid-wide wait of its own. JSON goes to $OUT/probe_graph_timing.json (default ./.out).
"""

import json
import os
import sys

import torch

from localkv.bench.ceilings import copy_rate
from localkv.kernels import chunk_scores

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import _bench_graphed  # noqa: E402

HKV, G, D, C, SETS, ROUNDS = 8, 4, 128, 16384, 8, 9
METHODS = [(8, False), (8, True), (64, False), (64, True)]   # (calls in the graph, GPU kept busy at the start)

hbm = copy_rate(2**30, "cuda") / 1e9
q = torch.randn(1, HKV * G, D, dtype=torch.bfloat16, device="cuda")
landmarks = [torch.randn(HKV, C, D, dtype=torch.bfloat16, device="cuda") for _ in range(SETS)]
nbytes = landmarks[0].numel() * 2 + HKV * C * 4               # what scoring must move: abstracts in, scores out
sources = [torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda") for _ in range(SETS)]
dest = torch.empty_like(sources[0])
ops = {"chunk_scores": ([lambda a=a: chunk_scores(q, a) for a in landmarks], nbytes),
       "copy": ([lambda s=s: dest.copy_(s) for s in sources], 2 * nbytes)}

us = {(op, m): [] for op in ops for m in METHODS}
for _ in range(ROUNDS):
    for op, (calls, _) in ops.items():
        for calls_n, busy in METHODS:
            us[(op, (calls_n, busy))].append(1e3 * _bench_graphed(calls, min_calls=calls_n, busy=busy))

rows = []
for (op, (calls_n, busy)), v in us.items():
    med = sorted(v)[len(v) // 2]
    moved = ops[op][1]
    rows.append(dict(op=op, calls=calls_n, busy=busy, us=med, pct_of_copy=100 * moved / (med * 1e-6) / 1e9 / hbm))
out_dir = os.environ.get("OUT") or "./.out"
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "probe_graph_timing.json"), "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": hbm, "MB": nbytes / 1e6, "rows": rows}, f, indent=2)

print(f"\n{torch.cuda.get_device_name()}: HBM copy {hbm:.0f} GB/s; {nbytes / 1e6:.1f} MB a call "
      f"(the copy reads and writes it); median of {ROUNDS} rounds")
print(f"{'op':<14}{'calls':>6}  {'start':<10}{'us/call':>9}{'% copy':>8}")
for r in rows:
    print(f"{r['op']:<14}{r['calls']:>6}  {'busy' if r['busy'] else 'idle':<10}{r['us']:>9.2f}{r['pct_of_copy']:>8.1f}")
