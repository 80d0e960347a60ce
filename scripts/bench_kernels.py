"""Benchmark localkv's Triton kernels on one CUDA GPU against ceilings measured in the same run.

    python scripts/bench_kernels.py            # about 1-2 minutes on an H100 (autotuning included)

Ceilings: device-to-device copy (read + write bytes / time) and pinned host-to-device copy. Each op reports
achieved GB/s = bytes that must move / median time (triton.testing.do_bench, L2 flushed between runs),
next to the plain torch way (the op's reference run on the GPU) and the max error against it. Shapes are
Llama-3.1-8B's (Hkv 8, G 4, D 128, bf16) at 128K-token index lists. Attention, chunk scoring, the chunk
select (`topk_ids`) and the slot assignment (`assign_slots`) are timed as a graphed decode step runs them, GPU
time per call in a CUDA graph of at least 64 calls (`_bench_graphed`): with do_bench the Python launcher's time
(tens of microseconds for a launch, a split-K pass and its merge) lands in the measurement. Chunk scoring moves
only 32 MB a call, so its calls rotate over eight sets of abstracts (more than L2 holds). The select and the
slot assignment move a few hundred KB, so they report µs against the torch way, not a share of a ceiling. The
others use do_bench. Goals: attention and scoring >= 70% of the copy bandwidth, pinned gather >= 80% of pinned
H2D. JSON goes to $OUT/bench_kernels.json (default ./.out); the table is printed last.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

HKV, G, D, CHUNK = 8, 4, 128, 8
CTX_TOKENS = 128 * 1024          # index lists / chunk pools of 128K tokens
BUDGET_CHUNKS = (256, 4096)      # chunks per head for gather and rebuild: a 2K-token budget, and 32K tokens
QUANT_TOKENS = 32 * 1024         # tokens of the quantized page
DT = torch.bfloat16
DEV = "cuda"


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


def _bench(fn) -> float:
    from triton.testing import do_bench

    fn()                                            # compile / autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


GRAPH_CALLS = 64
"""Calls a timed graph holds at least: its own start and end, a few microseconds, are shared among them."""


def _bench_graphed(calls, min_calls: int = GRAPH_CALLS, busy: bool = True) -> float:
    """Median ms per call of ``calls`` (closures over different buffers, together larger than L2), repeated in
    order to at least ``min_calls``, captured in one CUDA graph and replayed: the GPU time of an op as a
    graphed decode step runs it, every read coming from HBM, the gap between consecutive kernels included, and
    no Python launch time in between (which, for an op of ~10 us, would be most of it).

    Two fixed costs of a replay are not the op's, and are kept out:
    - The host's time to queue the graph. On an idle GPU the start event fires at once and the GPU then waits
      for the host, so the GPU is kept busy (a sleep kernel) until the graph is queued behind the event.
    - The graph's start and end, shared among `GRAPH_CALLS` calls rather than a few, as a decode step's
      hundreds of kernels share them.
    Together they are 0.5-0.9 us of a 16 us call in a graph of 8 calls on an idle GPU, and 0.7 us for a plain
    copy of the same bytes (docs/benchmarks.md, "Kernels"). ``min_calls=1, busy=False`` times a graph of the
    calls alone on an idle GPU, which counts both."""
    for c in calls:
        c()                                         # compile / autotune outside the capture
    torch.cuda.synchronize()
    calls = calls * -(-min_calls // len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(1_000_000)            # ~0.5 ms: the graph is queued before the GPU reaches `a`
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    return sorted(times)[len(times) // 2]


def _maxerr(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def ceilings() -> dict:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy_ms = _bench(lambda: b.copy_(a))
    h = _pin(torch.empty(n // 2, dtype=torch.uint8))
    d = torch.empty(n // 2, dtype=torch.uint8, device=DEV)
    h2d_ms = _bench(lambda: d.copy_(h, non_blocking=True))
    del a, b, d
    return {"copy_GBps": 2 * n / copy_ms / 1e6, "h2d_pinned_GBps": (n // 2) / h2d_ms / 1e6}


def _row(op, shape, nbytes, ms, ref_ms, err, ceiling_name, ceilings, goal, extra=None):
    gbps = nbytes / ms / 1e6
    pct = 100 * gbps / ceilings[ceiling_name] if ceiling_name else None
    return dict(op=op, shape=shape, MB=nbytes / 1e6, ms=ms, GBps=gbps, pct_of_ceiling=pct, ceiling=ceiling_name,
                torch_ms=ref_ms, speedup=(ref_ms / ms) if ref_ms else None, max_err=err,
                goal_pct=goal, meets_goal=(pct >= goal) if goal else None, **(extra or {}))


def bench_attention(ceil, Tq):
    from localkv.kernels import sparse_attention, sparse_attention_ref
    from localkv.kernels.sparse_attention import _sparse_attention_tuned

    n_sel, S = CTX_TOKENS // CHUNK, 512               # 128K selected tokens + a 512-token local window
    q = torch.randn(Tq, HKV * G, D, dtype=DT, device=DEV)
    kc, vc = (torch.randn(HKV, n_sel * CHUNK, D, dtype=DT, device=DEV) for _ in range(2))
    kd, vd = (torch.randn(HKV, S, D, dtype=DT, device=DEV) for _ in range(2))
    idx = torch.stack([torch.randperm(n_sel, device=DEV) for _ in range(HKV)]).int()
    run = lambda: sparse_attention(q, kd, vd, kc, vc, idx)  # noqa: E731
    ref = lambda: sparse_attention_ref(q, kd, vd, kc, vc, idx)  # noqa: E731
    ms = _bench_graphed([run] * 4)                  # 540 MB a call: no L2 reuse between calls
    (o, lse), (ro, rlse) = run(), ref()
    ref_ms = _bench_graphed([ref] * 2)
    nbytes = 2 * HKV * (S + n_sel * CHUNK) * D * 2 + idx.numel() * 4 + 2 * q.numel() * 2
    return _row("sparse_attention", f"Tq={Tq} list={n_sel * CHUNK // 1024}K+{S} dense", nbytes, ms, ref_ms,
                max(_maxerr(o, ro), _maxerr(lse, rlse)), "copy_GBps", ceil, 70,
                {"config": str(getattr(_sparse_attention_tuned, "best_config", None))})


def bench_scores(ceil, mode, tokens=CTX_TOKENS):
    from localkv.kernels import chunk_scores, chunk_scores_ref

    C = tokens // CHUNK
    q = torch.randn(1, HKV * G, D, dtype=DT, device=DEV)
    n_sets = max(2, 8 * CTX_TOKENS // tokens)      # 8 x 32 MB at 128K tokens: L2 is 50 MB
    copies = [torch.randn(HKV, C, D, dtype=DT, device=DEV) for _ in range(n_sets)]
    kws = [dict(landmarks=a) if mode == "landmark" else dict(kmin=a, kmax=a + 1.0) for a in copies]
    a, kw = copies[0], kws[0]
    calls = [lambda kw=kw: chunk_scores(q, **kw) for kw in kws]
    ms = _bench_graphed(calls)
    before_ms = _bench_graphed(calls, min_calls=1, busy=False)   # the calls alone, idle GPU: launch included
    ref_ms = _bench_graphed([lambda kw=kw: chunk_scores_ref(q, **kw) for kw in kws])
    err = _maxerr(chunk_scores(q, **kw), chunk_scores_ref(q, **kw))
    nbytes = len(kw) * a.numel() * 2 + HKV * C * 4
    return _row("chunk_scores", f"{mode} C={C} chunks ({tokens // 1024}K tokens)", nbytes, ms, ref_ms, err,
                "copy_GBps", ceil, 70, {"ms_method_before": before_ms,
                                        "pct_method_before": 100 * nbytes / before_ms / 1e6 / ceil["copy_GBps"]})


def bench_topk(ceil, chunks, k):
    """`topk_ids` on the rows a ShadowKV step selects from: 8 KV heads of landmark scores (``chunk_scores`` on
    random queries and landmarks), ``chunks`` columns, k ids a row; against ``torch.topk`` + a sort of the ids
    (which breaks ties by score order, not by id). The scores are L2-hot, as a step's just-written scores are."""
    from localkv.kernels import chunk_scores, topk_ids, topk_ids_ref

    q = torch.randn(1, HKV * G, D, dtype=DT, device=DEV)
    s = chunk_scores(q, torch.randn(HKV, chunks, D, dtype=DT, device=DEV))
    ref = topk_ids_ref(s, k)
    out = torch.empty_like(ref)
    ms = _bench_graphed([lambda: topk_ids(s, k, out=out)] * 20)
    ref_ms = _bench_graphed([lambda: torch.topk(s, k, dim=1).indices.sort(dim=1)] * 20)
    err = float((topk_ids(s, k, out=out) != ref).sum())
    return _row("topk_ids", f"{HKV}x{chunks} scores k={k}", s.numel() * 4, ms, ref_ms, err, None, ceil, None,
                {"us": 1e3 * ms, "torch_way": "torch.topk + sort"})


def bench_slots(ceil, chunks=16384, k=257, steps=20, keep=17):
    """`assign_slots` at a 128K ShadowKV step's shape: 8 KV heads, ``k`` chunks selected of ``chunks`` into
    2k slots, ``steps`` selections a replay, each keeping ``keep`` of the step before's chunks (the 6.6% hit rate
    of a synthetic 128K run); against its torch reference. Exactness: the kernel against the reference over the
    steps, twice over, from empty tables."""
    from localkv.kernels import assign_slots, assign_slots_ref

    n_slots = 2 * k
    sels = [torch.randperm(chunks, device=DEV)[:k]]
    for _ in range(steps - 1):
        last = sels[-1]
        fresh = torch.randperm(chunks, device=DEV)
        fresh = fresh[~torch.isin(fresh, last)][:k - keep]
        sels.append(torch.cat([last[torch.randperm(k, device=DEV)[:keep]], fresh]))
    sels = [x.sort().values.expand(HKV, k).contiguous() for x in sels]

    def tables():
        return (torch.full((HKV, chunks + 1), -1, dtype=torch.long, device=DEV),
                torch.full((HKV, n_slots + 1), -1, dtype=torch.long, device=DEV),
                torch.zeros(HKV, n_slots + 1, dtype=torch.int32, device=DEV),
                torch.zeros(HKV, dtype=torch.int32, device=DEV))

    ours, theirs = tables(), tables()
    wrong = 0
    for x in sels + sels:
        got = assign_slots(x, *ours, n_slots)
        want = assign_slots_ref(x, *theirs, n_slots)
        wrong += sum(int((a != b).sum()) for a, b in zip(got, want))
    t, hits = tables(), torch.zeros((), dtype=torch.long, device=DEV)
    ms = _bench_graphed([lambda x=x: assign_slots(x, *t, n_slots, hits) for x in sels])
    rt = tables()
    ref_ms = _bench_graphed([lambda x=x: assign_slots_ref(x, *rt, n_slots) for x in sels])
    nbytes = HKV * (k * 8 * 3 + n_slots * (8 + 4))                      # sel, slots, dst; slot tables
    return _row("assign_slots", f"{HKV}x{k} of {chunks} into {n_slots}", nbytes, ms, ref_ms, float(wrong), None,
                ceil, None, {"us": 1e3 * ms, "torch_way": "assign_slots_ref"})


def bench_gather(ceil, n_sel):
    from localkv.kernels import gather_pinned, gather_pinned_ref
    from localkv.kernels.gather_pinned import _gather_pinned_tuned

    N = CTX_TOKENS // CHUNK
    src = _pin(torch.randn(HKV, N * CHUNK, D, dtype=DT))          # 2 KB chunks, 256 MB pool
    idx = torch.stack([torch.randperm(N)[:n_sel] for _ in range(HKV)]).int().to(DEV)
    out, ref_out = (torch.empty(HKV, n_sel * CHUNK, D, dtype=DT, device=DEV) for _ in range(2))
    ms = _bench(lambda: gather_pinned(src, idx, out))
    ref_ms = _bench(lambda: gather_pinned_ref(src, idx, ref_out))
    nbytes = out.numel() * 2
    h = _pin(torch.empty(nbytes, dtype=torch.uint8))
    d = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    same_size_ms = _bench(lambda: d.copy_(h, non_blocking=True))
    err = float((out != ref_out).sum())
    return _row("gather_pinned", f"{n_sel} chunks/head x 2KB", nbytes, ms, ref_ms, err, "h2d_pinned_GBps", ceil, 80,
                {"h2d_same_size_GBps": nbytes / same_size_ms / 1e6,
                 "config": str(getattr(_gather_pinned_tuned, "best_config", None))})


def bench_lowrank(ceil, n_sel):
    from localkv.kernels import lowrank_rope, lowrank_rope_ref

    S, R = CTX_TOKENS, 160
    u = torch.randn(S, R, dtype=DT, device=DEV)
    sv = (torch.randn(HKV, R, D, device=DEV) / R ** 0.5).to(DT)
    idx = torch.stack([torch.randperm(S // CHUNK, device=DEV)[:n_sel] for _ in range(HKV)]).int()
    ang = torch.arange(S, device=DEV).float()[:, None] * torch.rand(D // 2, device=DEV)
    cos, sin = torch.cat((ang, ang), -1).cos().to(DT), torch.cat((ang, ang), -1).sin().to(DT)
    out, ref_out = (torch.empty(HKV, n_sel * CHUNK, D, dtype=DT, device=DEV) for _ in range(2))
    ms = _bench(lambda: lowrank_rope(u, sv, idx, cos, sin, out))
    ref_ms = _bench(lambda: lowrank_rope_ref(u, sv, idx, cos, sin, ref_out))
    rows = HKV * n_sel * CHUNK
    nbytes = rows * (R * 2 + D * 2 + 2 * D * 2)                         # U rows + out + cos/sin rows
    tflops = 2 * rows * R * D / ms / 1e9
    return _row("lowrank_rope", f"r={R} {n_sel} chunks/head", nbytes, ms, ref_ms, _maxerr(out, ref_out),
                "copy_GBps", ceil, None, {"TFLOPs": tflops})


def bench_quant(ceil, kind, bits):
    from localkv.kernels import dequantize_page, dequantize_page_ref, quantize_page, quantize_page_ref

    T, group = QUANT_TOKENS, 32
    x = torch.randn(HKV, T, D, dtype=DT, device=DEV)
    kw = dict(kind=kind, bits=bits, group=group)
    ms = _bench(lambda: quantize_page(x, **kw))
    ref_ms = _bench(lambda: quantize_page_ref(x, **kw))
    p, s, z = quantize_page(x, **kw)
    nbytes = x.numel() * 2 + p.numel() + 2 * s.numel() * 4
    q_row = _row("quantize_page", f"{kind} int{bits} {HKV}x{T}x{D}", nbytes, ms, ref_ms,
                 _maxerr(dequantize_page(p, s, z, **kw), dequantize_page_ref(*quantize_page_ref(x, **kw), **kw)),
                 "copy_GBps", ceil, None)
    ms = _bench(lambda: dequantize_page(p, s, z, **kw))
    ref_ms = _bench(lambda: dequantize_page_ref(p, s, z, **kw))
    d_row = _row("dequantize_page", f"{kind} int{bits} {HKV}x{T}x{D}", nbytes, ms, ref_ms,
                 _maxerr(dequantize_page(p, s, z, **kw), dequantize_page_ref(p, s, z, **kw)), "copy_GBps", ceil, None)
    return [q_row, d_row]


def bench_kmeans(ceil, keys, clusters):
    """`kmeans_assign` on one prefill chunk's keys of a layer (8 KV heads, ~16 keys a cluster): compute-bound, so
    reported in TFLOP/s (the products of every key with every centroid of its head), against torch's einsum."""
    from localkv.kernels import kmeans_assign, kmeans_assign_ref

    x = torch.randn(HKV, keys, D, dtype=DT, device=DEV)
    c = torch.randn(HKV, clusters, D, dtype=DT, device=DEV)
    out = torch.empty(HKV, keys, dtype=torch.long, device=DEV)
    ms = _bench_graphed([lambda: kmeans_assign(x, c, out=out)] * 8)
    ref_ms = _bench_graphed([lambda: kmeans_assign_ref(x, c)] * 8)
    err = float((kmeans_assign(x, c) != kmeans_assign_ref(x, c)).float().mean())   # share of keys that differ
    flops = 2 * HKV * keys * clusters * D
    return _row("kmeans_assign", f"{HKV}x{keys} keys, {clusters} centroids", x.numel() * 2 + c.numel() * 2, ms,
                ref_ms, err, None, ceil, None, {"TFLOPs": flops / ms / 1e9})


def _table(rows) -> str:
    head = (f"{'op':<17}{'shape':<30}{'MB':>9}{'ms':>9}{'GB/s':>9}{'%ceil':>7}{'torch ms':>10}{'speedup':>9}"
            f"{'max err':>10}  goal")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<17}{r.get('shape', ''):<30}  ERROR {r['error']}")
            continue
        goal = "" if r["goal_pct"] is None else (f">={r['goal_pct']}% " + ("ok" if r["meets_goal"] else "MISSED"))
        pct = "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.0f}%"
        lines.append(f"{r['op']:<17}{r['shape']:<30}{r['MB']:>9.1f}{r['ms']:>9.3f}{r['GBps']:>9.0f}"
                     f"{pct:>7}{r['torch_ms']:>10.3f}{r['speedup']:>8.1f}x"
                     f"{r['max_err']:>10.2g}  {goal}")
    return "\n".join(lines)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (on the CPU every op runs its torch reference)", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, pinned H2D {ceil['h2d_pinned_GBps']:.1f} GB/s", flush=True)
    jobs = [("sparse_attention", bench_attention, (1,)), ("sparse_attention", bench_attention, (8,)),
            ("chunk_scores", bench_scores, ("landmark",)), ("chunk_scores", bench_scores, ("minmax",)),
            ("chunk_scores", bench_scores, ("landmark", 8 * CTX_TOKENS)),
            ("topk_ids", bench_topk, (CTX_TOKENS // CHUNK, 257)),
            ("topk_ids", bench_topk, (8 * CTX_TOKENS // CHUNK, 2049)),
            ("assign_slots", bench_slots, ()),
            *[("gather_pinned", bench_gather, (n,)) for n in BUDGET_CHUNKS],
            *[("lowrank_rope", bench_lowrank, (n,)) for n in BUDGET_CHUNKS],
            ("kv_quant", bench_quant, ("key", 4)), ("kv_quant", bench_quant, ("value", 4)),
            ("kv_quant", bench_quant, ("value", 8)),
            ("kmeans_assign", bench_kmeans, (4096, 256)), ("kmeans_assign", bench_kmeans, (16384, 1024))]
    rows = []
    for name, fn, args in jobs:
        t = time.time()
        try:
            got = fn(ceil, *args)
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as e:  # keep going: one broken op must not hide the others' numbers
            traceback.print_exc()
            rows.append({"op": name, "shape": str(args), "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()
        print(f"  {name}{args}: {time.time() - t:.1f}s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": ceil, "rows": rows, "wall_s": time.time() - t0}
    out_dir = os.environ.get("OUT") or "./.out"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_kernels.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{result['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy {ceil['copy_GBps']:.0f} GB/s  pinned H2D {ceil['h2d_pinned_GBps']:.1f} GB/s  "
          f"({result['wall_s']:.0f}s)")
    print(_table(rows))
    before = [r for r in rows if "pct_method_before" in r]
    if before:
        print("chunk_scores timed as a graph of the row's 8 or 2 calls alone, on an idle GPU: "
              + ", ".join(f"{r['shape'].split(' (')[0]} {1e3 * r['ms_method_before']:.1f} us "
                          f"{r['pct_method_before']:.0f}%" for r in before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
