"""Sweep (development aid): the graphed ShadowKV decode step's chunk selection and the 8B shape's projections.

    python scripts/sweep_decode_ops.py [--topk-baseline FILE] [--slots-baseline FILE] [--topk-only]

- ``topk_ids`` on the rows a 128K ShadowKV step selects from (8 KV heads x 16,384 landmark scores from
  ``chunk_scores`` on random queries and landmarks, k = 257; the same at 16,380 columns, as a step's rows are
  before `select_chunks` pads them; a 1M step's 131,072, k = 2,049), graphed: for several ``WARPS``,
  against ``torch.topk`` + sort, and against another version of ``kernels/topk_ids.py`` given as a file
  (``git show REV:localkv/kernels/topk_ids.py > old_topk_ids.py``) on the same rows.
- ``assign_slots`` at the 128K step's shape (8 KV heads, 257 chunks selected of 16,384 into 514 slots), 20 steps
  a replay, each selection keeping 17 of the step before's chunks (the 6.6% hit rate of a synthetic 128K
  run): for several ``WARPS``, and against another version of ``kernels/slot_assign.py`` (``--slots-baseline``).
- The Llama-3.1-8B shape's one-token products (skipped with ``--topk-only``) (qkv, o, gate|up, down, lm_head), graphed, weights rotating
  through copies larger than L2: ``F.linear`` on the (out, in) weight as the model stores it, and a matmul on
  an (in, out) copy, each in GB/s and as a share of the device copy rate measured here.
"""
import sys

import torch

from localkv.bench.ceilings import copy_rate
from localkv.kernels import assign_slots, assign_slots_ref, chunk_scores, topk_ids, topk_ids_ref

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import _bench_graphed, baseline_module  # noqa: E402

tk = sys.modules["localkv.kernels.topk_ids"]   # the package re-exports a function of that name
sa = sys.modules["localkv.kernels.slot_assign"]
DT = torch.bfloat16
hbm = copy_rate(2**30, "cuda") / 1e9
print(f"HBM copy {hbm:.0f} GB/s", flush=True)
rows = []


def us(calls) -> float:
    return 1e3 * _bench_graphed(calls)


# --- topk_ids -------------------------------------------------------------------------------------------------
HKV, G, D, C, K = 8, 4, 128, 16384, 257
q = torch.randn(1, HKV * G, D, dtype=DT, device="cuda")
score_sets = {   # name: (scores, k); the 1M step's rows are 131,072 chunks with k = 2,049 (several blocks)
    "landmark scores": (chunk_scores(q, torch.randn(HKV, C, D, dtype=DT, device="cuda")), K),
    "normal": (torch.randn(HKV, C, device="cuda"), K),
    "landmark, 16,380 cols (unaligned)": (
        chunk_scores(q, torch.randn(HKV, C - 4, D, dtype=DT, device="cuda")), K),
    "1M landmark scores": (chunk_scores(q, torch.randn(HKV, 8 * C, D, dtype=DT, device="cuda")), 8 * K - 7),
}
baseline = baseline_module("--topk-baseline", "_baseline_topk_ids")
for name, (s, k) in score_sets.items():
    ref = topk_ids_ref(s, k)
    out = torch.empty_like(ref)
    t = us([lambda: torch.topk(s, k, dim=1).indices.sort(dim=1)] * 20)
    rows.append((f"topk {name}", "torch.topk + sort", t, ""))
    if baseline is not None:
        ok = torch.equal(baseline.topk_ids(s, k, out=out), ref)
        rows.append((f"topk {name}", "--topk-baseline", us([lambda: baseline.topk_ids(s, k, out=out)] * 20),
                     "exact" if ok else "WRONG"))
    default = tk.WARPS
    for warps in (4, 8, 16):
        tk.WARPS = warps
        ok = torch.equal(topk_ids(s, k, out=out), ref)
        rows.append((f"topk {name}", f"WARPS={warps}", us([lambda: topk_ids(s, k, out=out)] * 20),
                     "exact" if ok else "WRONG"))
        print(rows[-1], flush=True)
    tk.WARPS = default

# --- assign_slots ---------------------------------------------------------------------------------------------
N_SLOTS, STEPS, KEEP = 2 * K, 20, 17
sels = [torch.randperm(C, device="cuda")[:K]]
for _ in range(STEPS - 1):   # each step keeps KEEP of the last step's chunks, the rest drawn afresh
    last = sels[-1]
    fresh = torch.randperm(C, device="cuda")
    fresh = fresh[~torch.isin(fresh, last)][:K - KEEP]
    sels.append(torch.cat([last[torch.randperm(K, device="cuda")[:KEEP]], fresh]))
sels = [s.sort().values.expand(HKV, K).contiguous() for s in sels]


def slot_tables():
    return (torch.full((HKV, C + 1), -1, dtype=torch.long, device="cuda"),
            torch.full((HKV, N_SLOTS + 1), -1, dtype=torch.long, device="cuda"),
            torch.zeros(HKV, N_SLOTS + 1, dtype=torch.int32, device="cuda"),
            torch.zeros(HKV, dtype=torch.int32, device="cuda"))


def slots_exact(module) -> bool:
    """The version's kernel against its own reference over the 20 steps, twice round, from empty tables."""
    ours, ref = slot_tables(), slot_tables()
    for s in sels + sels:
        got = module.assign_slots(s, *ours, N_SLOTS)
        want = module.assign_slots_ref(s, *ref, N_SLOTS)
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            return False
    return True


slots_baseline = baseline_module("--slots-baseline", "_baseline_slot_assign")
versions = [("--slots-baseline", slots_baseline, None)] if slots_baseline is not None else []
versions += [(f"WARPS={w}", sa, w) for w in (4, 8, 16)]
default = sa.WARPS
for how, module, warps in versions:
    if warps is not None:
        module.WARPS = warps
    tables = slot_tables()
    hits = torch.zeros((), dtype=torch.long, device="cuda")
    t = us([lambda s=s: module.assign_slots(s, *tables, N_SLOTS, hits) for s in sels])
    rows.append(("slots 8x257 of 514", how, t, "exact" if slots_exact(module) else "WRONG"))
    print(rows[-1], flush=True)
sa.WARPS = default
ref_tables = slot_tables()
t = us([lambda s=s: assign_slots_ref(s, *ref_tables, N_SLOTS) for s in sels])
rows.append(("slots 8x257 of 514", "torch (the reference)", t, ""))

# --- projections ----------------------------------------------------------------------------------------------
x = torch.randn(1, 4096, dtype=DT, device="cuda")
projections = {"qkv": (6144, 4096), "o": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}
if "--topk-only" in sys.argv:
    projections = {}
for name, (n_out, n_in) in projections.items():
    copies = max(2, -(-200 * 2**20 // (n_out * n_in * 2)))           # > 4 x L2 in all
    ws = [torch.randn(n_out, n_in, dtype=DT, device="cuda") for _ in range(copies)]
    xi = x if n_in == 4096 else torch.randn(1, n_in, dtype=DT, device="cuda")
    nbytes = n_out * n_in * 2
    t = us([lambda w=w: torch.nn.functional.linear(xi, w) for w in ws])
    rows.append((f"{name} {n_out}x{n_in}", "F.linear, (out, in)", t, f"{nbytes / t / 1e3:.0f} GB/s, "
                 f"{nbytes / t / 1e3 / hbm:.0%}"))
    wts = [w.t().contiguous() for w in ws]
    del ws
    t = us([lambda w=w: xi @ w for w in wts])
    rows.append((f"{name} {n_out}x{n_in}", "x @ W, (in, out)", t, f"{nbytes / t / 1e3:.0f} GB/s, "
                 f"{nbytes / t / 1e3 / hbm:.0%}"))
    del wts
    print(rows[-2:], flush=True)

print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; graphed GPU time per call")
print(f"{'what':<28} {'how':<24} {'us':>8}  note")
for what, how, t, note in rows:
    print(f"{what:<28} {how:<24} {t:8.1f}  {note}")
