"""Sweep (development aid): sparse-attention split sizes and tile configs, chunk-scoring timing modes, on one GPU.

    python scripts/sweep_kernels.py [--scores-only] [--baseline FILE]

``--baseline FILE`` also times another version of ``kernels/chunk_scores.py`` on the same abstracts in the same
run, e.g. the two-launch landmark scoring it replaced:
``git show 5a3a8bc:localkv/kernels/chunk_scores.py > old_chunk_scores.py``.
"""
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench, do_bench_cudagraph

from localkv.bench.ceilings import copy_rate
from localkv.kernels import chunk_scores, chunk_scores_ref, sparse_attention

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import _bench_graphed, baseline_module  # noqa: E402

sa = sys.modules["localkv.kernels.sparse_attention"]  # the package re-exports a function of that name

HKV, G, D, CHUNK, DT = 8, 4, 128, 8, torch.bfloat16
n_sel, S = 128 * 1024 // CHUNK, 512
kc, vc = (torch.randn(HKV, n_sel * CHUNK, D, dtype=DT, device="cuda") for _ in range(2))
kd, vd = (torch.randn(HKV, S, D, dtype=DT, device="cuda") for _ in range(2))
idx = torch.stack([torch.randperm(n_sel, device="cuda") for _ in range(HKV)]).int()
nbytes = 2 * HKV * (S + n_sel * CHUNK) * D * 2
hbm = copy_rate(2**30, "cuda") / 1e9
print(f"HBM copy {hbm:.0f} GB/s")
if "--scores-only" not in sys.argv:
    orig = sa._sparse_attention_tuned
    for Tq in (1, 8):
        q = torch.randn(Tq, HKV * G, D, dtype=DT, device="cuda")
        best = None
        for split in (512, 1024, 2048, 4096, 8192, 16384):
            f = lambda: sparse_attention(q, kd, vd, kc, vc, idx, split_tokens=split)  # noqa: E731
            f()
            ms = do_bench(f, return_mode="median")
            msg = do_bench_cudagraph(f, return_mode="median")
            print(f"Tq={Tq} split={split}: {ms * 1e3:.0f} us ({nbytes / ms / 1e6 / hbm:.0%}), graph {msg * 1e3:.0f} us "
                  f"({nbytes / msg / 1e6 / hbm:.0%}) cfg {orig.best_config}", flush=True)
            best = min(best or (9e9, 0), (msg, split))
        split = best[1]
        res = []
        for bn in (32, 64, 128):
            for w in (2, 4, 8):
                for st in (2, 3, 4, 5):
                    sa._sparse_attention_tuned = triton.autotune(
                        [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)],
                        key=["BLOCK_M", "BLOCK_D", "CHUNK", "CAUSAL", "HAS_LEN"])(sa._sparse_attention_kernel)
                    f = lambda: sparse_attention(q, kd, vd, kc, vc, idx, split_tokens=split)  # noqa: E731
                    try:
                        f()
                        ms = do_bench_cudagraph(f, return_mode="median")
                    except Exception as e:
                        print(bn, w, st, "failed", str(e)[:80])
                        continue
                    res.append((ms, bn, w, st))
        sa._sparse_attention_tuned = orig
        res.sort()
        for ms, bn, w, st in res[:6]:
            print(f"Tq={Tq} split={split} BLOCK_N={bn} warps={w} stages={st}: {ms * 1e3:.0f} us "
                  f"({nbytes / ms / 1e6 / hbm:.0%})", flush=True)

# Dense-only decode attention at 8K rows through dense_len (the graphed decode step's attention)
q = torch.randn(1, HKV * G, D, dtype=DT, device="cuda")
kb, vb = (torch.randn(HKV, 9216, D, dtype=DT, device="cuda") for _ in range(2))
n = torch.tensor([8193], dtype=torch.int32, device="cuda")
f = lambda: sparse_attention(q, kb, vb, causal=True, dense_len=n)  # noqa: E731
f()
ms = do_bench_cudagraph(f, return_mode="median")
print(f"dense 8K decode attention: {ms * 1e3:.1f} us ({2 * HKV * 8193 * D * 2 / ms / 1e6 / hbm:.0%} of HBM)")

for C in (16384, 131072):
    a = torch.randn(HKV, C, D, dtype=DT, device="cuda")
    for mode, kw in (("landmark", dict(landmarks=a)), ("minmax", dict(kmin=a, kmax=a + 1))):
        f = lambda: chunk_scores(q, **kw)  # noqa: E731
        f()
        b = len(kw) * a.numel() * 2
        ms, msg = do_bench(f, return_mode="median"), do_bench_cudagraph(f, return_mode="median")
        print(f"chunk_scores {mode} C={C}: {ms * 1e3:.0f} us ({b / ms / 1e6 / hbm:.0%}), "
              f"graph {msg * 1e3:.0f} us ({b / msg / 1e6 / hbm:.0%})", flush=True)

# Landmark scoring's tile and programs per SM (graphed, L2 cold through rotating sets), beside a kernel that
# only reads the same bytes in one launch: what any single launch over them can reach.
cs = sys.modules["localkv.kernels.chunk_scores"]


@triton.jit
def _read_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr, PER: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.range(0, PER, num_stages=3):
        offs = (pid * PER + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def graphed(calls):
    """us of GPU time per call, the calls captured in one CUDA graph (bench_kernels' method)."""
    return 1e3 * _bench_graphed(calls)


baseline = baseline_module("--baseline", "_baseline_chunk_scores")

summary = []
for C in (16384, 131072):
    sets = [torch.randn(HKV, C, D, dtype=DT, device="cuda") for _ in range(8 if C == 16384 else 2)]
    share = lambda us: sets[0].numel() * 2 / us / 1e3 / hbm  # noqa: E731
    sink = torch.empty(4096, device="cuda")
    n = sets[0].numel()
    us = graphed([lambda a=a: _read_kernel[(triton.cdiv(n, 4096 * 8),)](a, sink, n, BLOCK=4096, PER=8, num_warps=8)
                  for a in sets])
    print(f"read only C={C}: {us:.1f} us ({share(us):.0%})", flush=True)
    summary.append((C, "a kernel that only reads the bytes", us, share(us)))
    ref = chunk_scores_ref(q, sets[0])
    us = graphed([lambda a=a: chunk_scores(q, a) for a in sets])
    summary.append((C, "landmark scoring (localkv.kernels, default tile)", us, share(us)))
    if baseline is not None:
        err = float((baseline.chunk_scores(q, sets[0]) - ref).abs().max() / ref.abs().max())
        us = graphed([lambda a=a: baseline.chunk_scores(q, a) for a in sets])
        summary.append((C, f"landmark scoring (--baseline, err {err:.1e})", us, share(us)))
    default = dict(cs.TILE)
    for bc in (32, 64, 128):
        for w in (2, 4):
            for st in (2, 3):
                for per_sm in (2, 4):
                    cs.TILE.update(block_c=bc, warps=w, stages=st, per_sm=per_sm)
                    err = float((chunk_scores(q, sets[0]) - ref).abs().max() / ref.abs().max())
                    us = graphed([lambda a=a: chunk_scores(q, a) for a in sets])
                    print(f"landmark C={C} block_c={bc} warps={w} stages={st} per_sm={per_sm}: {us:.1f} us "
                          f"({share(us):.0%}) err {err:.1e}", flush=True)
    cs.TILE.update(default)

print("\n| chunks | landmark scoring, graphed, L2 cold | us | share of HBM copy |\n|---|---|---|---|")
for C, name, us, r in summary:
    print(f"| {C:,} | {name} | {us:.1f} | {r:.0%} |")
