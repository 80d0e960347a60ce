"""Sweep (development aid): sparse-attention split sizes and tile configs, chunk-scoring timing modes, on one GPU."""
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from localkv.bench.ceilings import copy_rate
from localkv.kernels import chunk_scores, sparse_attention

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import _bench_graphed  # noqa: E402

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

# The two passes of landmark scoring on their own (graphed, L2 cold through 8 rotating sets), per pass-1 tile.
cs = sys.modules["localkv.kernels.chunk_scores"]
C = 16384
sets = [torch.randn(HKV, C, D, dtype=DT, device="cuda") for _ in range(8)]


def graphed(calls):
    """us of GPU time per call, the calls captured in one CUDA graph (bench_kernels' method)."""
    return 1e3 * _bench_graphed(calls)


class _Skip:
    def __getitem__(self, grid):
        return lambda *a, **k: None


orig_finish = cs._chunk_scores_finish_kernel
for bc in (64, 128, 256):
    for w in (2, 4, 8):
        cs.TILE.update(landmark_chunks=bc, warps=w)
        both = graphed([lambda a=a: chunk_scores(q, a) for a in sets])
        cs._chunk_scores_finish_kernel = _Skip()
        one = graphed([lambda a=a: chunk_scores(q, a) for a in sets])
        cs._chunk_scores_finish_kernel = orig_finish
        print(f"landmark C={C} BLOCK_C={bc} warps={w}: both passes {both:.1f} us ({34e6 / both / 1e3 / hbm:.0%}), "
              f"pass 1 {one:.1f} us", flush=True)
