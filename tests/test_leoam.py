"""The LeoAM policy: exact with the whole context in its budget (device, CPU and disk pages), the planted chunk
selected at a small budget, variable chunks where attention gathers, truncation as a run that never had the tail,
the chunk cache's hits, stats, and the planner."""

import numpy as np
import pytest
import torch

from localkv.errors import UserError
from localkv.offload import make_cache
from localkv.offload.disk_reads import BLOCK
from localkv.offload.policies.leoam.chunking import UNIT, abstracts, cut_fixed, cut_variable, unit_rows
from localkv.offload.store import Budgets
from policy_runs import run as _run, tier_budgets as _budgets

V = 100  # vocabulary of the tiny model
OPTS = dict(sink_tokens=16, block_tokens=64, max_chunk_tokens=64, score_queries=16, window_tokens=16,
            page_tokens=32, chunk_tokens=32, chunk_mass=0.125)


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    """The torch references on the CPU (the kernels have their own tests under tests/kernels)."""
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")




@pytest.mark.parametrize("chunking,cache_factor", [("variable", None), ("fixed", None), ("variable", 0)])
def test_full_budget_equals_exact_over_cpu_and_disk_pages(tiny, tmp_path, chunking, cache_factor):
    """Every sealed unit selected: the same logits as exact, prefill, decode (generated tokens sealed) and
    truncation behind seals, with the chunks read from CPU and disk pages; with a chunk cache per layer, or none
    (one buffer the layers share)."""
    model, args = tiny
    ids = torch.randint(0, V, (420,))
    ref = make_cache("exact", args, 1024)
    got = make_cache("leoam", args, 1024, budgets=_budgets(args, tmp_path, 0, 3), budget=1.0, chunking=chunking,
                     cache_factor=cache_factor, **OPTS)
    outs = []
    with torch.no_grad():
        for cache in (ref, got):
            out = [_run(model, cache, ids, [0, 150, 300], 360)]
            cache.truncate(231)   # back behind two seals: blocks come back to the window from the store
            out += [_run(model, cache, ids, [231, 240], 300)]
            outs.append(torch.cat(out))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    s = got.stats()
    assert s["disk_tokens"] > 0 and s["moved_bytes_per_token"]["disk_read"] > 0
    assert s["moved_bytes_per_token"]["cpu"] > 0 and s["chunks_selected"] > 1
    assert 0 < s["hit_rate"] < 1 if cache_factor is None else s["hit_rate"] == 0
    assert s["policy"] == "leoam" and s["budget_tokens"] == 300 and s["chunking"] == chunking
    for key in ("units_selected", "chunk_tokens_mean", "chunk_tokens_min", "chunk_tokens_max", "gpu_tokens",
                "moved_bytes", "index_device_bytes"):
        assert key in s


@pytest.mark.parametrize("abstract_dtype", ["kv", "int8"])
def test_planted_needle_is_selected_at_a_small_budget(tiny, abstract_dtype):
    """Synthetic KV: one chunk's keys align with the query. At a budget of one chunk the policy selects it, its
    recall is near the exact attention's mass there, and a second step with the same query hits the cache."""
    _, args = tiny
    Hkv, D, G = args.n_kv_heads, args.head_dim, args.n_heads // args.n_kv_heads
    cache = make_cache("leoam", args, 2048, budget=32, chunking="fixed", measure_recall=True,
                       abstract_dtype=abstract_dtype, **OPTS)
    n = 16 + 64 * 12 + 40
    keys, values = 0.3 * torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)   # small keys: loose bounds stay low
    direction = torch.nn.functional.normalize(torch.randn(Hkv, D), dim=-1)
    needle = 16 + 64 * 7 + 32                                       # one fixed 32-token chunk, in block 7
    keys[needle:needle + 32] = 6 * direction + 0.1 * torch.randn(32, Hkv, D)
    layer = cache.layer(0)
    start = cache.reserve(n)
    layer.load(start, keys, values)                                # the session path: rotated keys as they are
    q = (8 * direction).repeat_interleave(G, 0)[None]              # (1, Hq, D)
    sel = layer._select(q, 2)                                      # two units: the needle's chunk
    assert sel.tolist() == [[needle // UNIT, needle // UNIT + 1]] * Hkv
    hits = int(cache.hits)
    for _ in range(2):
        layer._attend(q)
    assert int(cache.hits) - hits == 2 * Hkv                      # the second step found both units
    assert cache.stats()["attention_recall"] > 0.9


def test_variable_chunks_follow_the_attention():
    """Sizes in units of 16 within [16, max], covering the block once; small where the weight gathers, large
    over deserts; a fixed option gives equal chunks; abstracts bound every key."""
    U, Wq = 64, 8
    rows = torch.full((Wq, U), 1e-4)
    rows[:, 10] = rows[:, 11] = 1.0                                # two heavy units, the rest a desert
    rows[:, 40] = 0.5
    sizes = cut_variable(rows, mass=0.125, max_units=16)
    assert sum(sizes) == U and all(1 <= c <= 16 for c in sizes)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    own = lambda u: next(c for a, c in zip(bounds, sizes) if a <= u < a + c)  # noqa: E731
    assert own(10) == own(11) == own(40) == 1 and max(sizes) == 16 and len(sizes) < 16
    assert cut_fixed(U, 4) == [4] * 16
    # Rows from real attention: queries that look at one unit give it the weight.
    keys = torch.randn(2, 256, 16)
    q = 4 * keys[:, 100][None].repeat_interleave(2, 1).expand(8, -1, -1)  # (8, Hq 4, D)
    r = unit_rows(q, keys)
    assert r.shape == (8, 16) and int(r.sum(0).argmax()) == 100 // UNIT
    assert cut_variable(r, 0.125, 16)[:7].count(1) >= 1
    lo, hi = abstracts(keys, [1, 3, 12])
    assert lo.shape == (2, 3, 16) and (keys[:, 16:64] >= lo[:, 1:2]).all() and (keys[:, 16:64] <= hi[:, 1:2]).all()


@pytest.mark.parametrize("cut", [92, 101])
def test_truncate_then_continue_equals_a_run_without_the_tail(tiny, tmp_path, cut):
    """At a small budget (selection matters): prefill, decode, a second prefill and decode, truncated back into
    the middle, continued, against a cache that never saw the cut part; and speculative rollbacks. Cut 92 puts
    the rollbacks across a seal: a cut inside the ``L`` tokens after the newest sealed block unseals it."""
    model, args = tiny
    mk = lambda: make_cache("leoam", args, 2048, budgets=_budgets(args, tmp_path, 2, 4), budget=48,  # noqa: E731
                            **OPTS)
    X, Y, Z, R = (torch.randint(0, V, (n,)) for n in (300, 200, 90, 40))
    with torch.no_grad():
        a, b = mk(), mk()
        for c in (a, b):
            _run(model, c, X, [0, 300], 0)
            for t in R[:20]:
                model(t[None], c, decode=True)
        n = a.length
        model(Y, a, all_logits=True)
        for t in R[20:]:
            model(t[None], a, decode=True)
        assert n == 320
        a.truncate(n + cut)   # behind the seals of Y's prefill (412: inside block 5's scoring queries)
        model(Y[:cut], b)
        got = [_run(model, c, Z, [0, 90], 0) for c in (a, b)]
        got = [torch.cat([g] + [model(t[None], c, decode=True) for t in R]) for g, c in zip(got, (a, b))]
        torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-4)
        rows = [[], []]
        for i in range(0, 36, 3):                    # decode 4, keep 1, against decoding that one alone
            for t in R[i:i + 4]:
                model(t[None], a, decode=True)
            a.truncate(a.length - 3)
            rows[0].append(model(R[i + 1:i + 2], a, decode=True))
            model(R[i:i + 1], b, decode=True)
            rows[1].append(model(R[i + 1:i + 2], b, decode=True))
        torch.testing.assert_close(torch.cat(rows[0]), torch.cat(rows[1]), rtol=1e-4, atol=1e-4)
    assert a.stats()["chunks"] == b.stats()["chunks"] and a.stats()["units_selected"] <= 3


def test_options_are_checked(tiny):
    _, args = tiny
    with pytest.raises(UserError, match="unknown leoam option"):
        make_cache("leoam", args, 256, budgt=3)
    with pytest.raises(UserError, match="multiple of 16"):
        make_cache("leoam", args, 256, block_tokens=40)
    with pytest.raises(UserError, match="chunking"):
        make_cache("leoam", args, 256, chunking="tree")


def test_planner_counts_the_abstracts(capsys):
    """`localkv plan --policy leoam` runs, and the abstracts and chunk cache come off the GPU budget."""
    from localkv.bench.shapes import shape_args
    from localkv.cli import main
    from localkv.offload.planner import make_plan
    from localkv.offload.policies.leoam.cache import plan_bytes

    args = shape_args("llama3-8b")
    gpu, abstract, step = plan_bytes(args, 128 * 1024, 2)
    chunks = 128 * 1024 // 16      # the most variable chunks can cut
    assert abstract == 2 * chunks * 1024 * 2 * 32 and step == 2048 * 2 * 1024 * 2 * 32 and gpu > abstract
    kw = dict(device="cpu", kv_dtype=torch.bfloat16, weights_bytes=0, gpu_mem=8 * 2**30, cpu_mem=64 * 2**30)
    plan = make_plan(args, 128 * 1024, policy="leoam", **kw)
    exact = make_plan(args, 128 * 1024, policy="exact", **kw)
    assert plan.gpu.budget == exact.gpu.budget - gpu
    assert main(["plan", "--policy", "leoam", "--ctx", "32K"]) == 0
    assert "leoam" in capsys.readouterr().out


def test_the_plan_fits_a_million_tokens_on_a_24_gb_card(tmp_path):
    """Llama-3.1-8B at 1M under 24 GB (15 GB of weights): full abstracts and a chunk cache do not fit, so the plan
    takes int8 abstracts and the cache the room allows, and the cache it makes holds them."""
    from localkv.bench.shapes import shape_args
    from localkv.offload.planner import make_plan
    from localkv.offload.policies.leoam.cache import LeoAMConfig, fitting_options

    args = shape_args("llama3-8b")
    chosen = fitting_options(args, 1 << 20, 2, LeoAMConfig(), 6 << 30)
    assert chosen == {"abstract_dtype": "int8", "cache_factor": 0.0}
    assert fitting_options(args, 128 * 1024, 2, LeoAMConfig(), 6 << 30) == {"abstract_dtype": "kv", "cache_factor": 2.0}
    assert fitting_options(args, 1 << 20, 2, LeoAMConfig(abstract_dtype="kv"), 6 << 30)["abstract_dtype"] == "kv"
    plan = make_plan(args, 1 << 20, policy="leoam", device="cpu", kv_dtype=torch.bfloat16, weights_bytes=0,
                     gpu_mem=6 << 30, disk=tmp_path, disk_mem=200 << 30)     # a CPU: device memory, then disk
    assert plan.policy_options == chosen and plan.gpu.tokens > 0 and plan.disk.tokens > 0.9 * (1 << 20)


def test_disk_reads_are_threaded_cached_and_prefetched(tiny, tmp_path):
    """Disk blocks through reader threads and the host cache give the logits of the synchronous path bit for bit
    and read fewer bytes; a step whose blocks are cached reads nothing; prefetched blocks are not read again; a
    step's K and V asks together read each block once."""
    model, args = tiny
    ids = torch.randint(0, V, (340,))
    caches, outs = [], []
    with torch.no_grad():
        for threads in (0, 4):
            c = make_cache("leoam", args, 1024, budgets=_budgets(args, tmp_path, 0, 2), budget=64,
                           io_threads=threads, **OPTS)
            outs.append(_run(model, c, ids, [0, 300], 340))
            caches.append(c)
    assert torch.equal(outs[0], outs[1])
    sync, s = caches[0].stats(), caches[1].stats()
    assert 0 < s["moved_bytes_per_token"]["disk_read"] < sync["moved_bytes_per_token"]["disk_read"]
    assert s["cpu_cache_hit_rate"] > 0 and sync["cpu_cache_hit_rate"] == 0 and s["disk_wait_ms_per_token"] >= 0
    cache = caches[1]
    layer, reader = cache.layer(0), cache.disk_blocks
    q = torch.randn(1, args.n_heads, args.head_dim)

    def step():   # one decode attention with the device chunk cache emptied: every selected chunk is fetched
        with torch.inference_mode():
            layer.buffer.forget_from(0)
            return layer._attend(q)

    reader.forget_from(0, 0)
    before = reader.bytes_read
    first = step()
    blocks = layer.chunks.disk_blocks                                         # (keys, disk slots)
    assert len(blocks[0]) and reader.bytes_read - before == len(blocks[0]) * BLOCK     # each block read once
    before = reader.bytes_read
    assert torch.equal(step(), first) and reader.bytes_read == before        # all cached: no disk read
    reader.forget_from(0, 0)
    reader.useful[0] = 1.0   # as for a layer whose steps use what it prefetches
    reader.prefetch(0, blocks)
    reader.drain()
    before, hits = reader.bytes_read, reader.hits
    assert torch.equal(step(), first)
    assert reader.bytes_read == before and reader.hits - hits == len(blocks[0])   # the step's asks: all hits


def test_a_corrupt_block_on_disk_is_named_and_refused(tiny, tmp_path):
    """A flipped byte in a layer file: the decode step that reads it fails with a message naming the file."""
    model, args = tiny
    ids = torch.randint(0, V, (340,))
    cache = make_cache("leoam", args, 1024, budgets=_budgets(args, tmp_path, 0, 2), budget=64, **OPTS)
    with torch.no_grad():
        _run(model, cache, ids, [0, 300], 300)
        path = cache.store.disk.path(0)
        data = bytearray(path.read_bytes())
        data[:] = bytes(b ^ 0xFF for b in data)       # every block of layer 0's file
        path.write_bytes(bytes(data))
        cache.disk_blocks.forget_from(0, 0)
        with pytest.raises(UserError, match=r"layer_000\.kv is corrupt"):
            _run(model, cache, ids, [300], 310)


def test_bench_needles_on_disk_and_disk_reads(tmp_path, monkeypatch, capsys):
    """`localkv bench --synthetic-kv` over device memory and disk: every row finds every planted needle (some live
    on disk), and LeoAM reads from disk only the blocks of the chunks it selects: a fraction of what lives there."""
    import json

    from localkv.bench.shapes import SHAPES
    from localkv.cli import main

    monkeypatch.setitem(SHAPES, "tiny", dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                                             vocab_size=256))
    rows = []
    for policy, gpu_mem in (("leoam,exact", "6MB"), ("shadowkv", "12MB")):   # ShadowKV's index is the larger
        code = main(["bench", "--shape", "tiny", "--ctx", "8K", "--synthetic-kv", "--policy", policy, "--device",
                     "cpu", "--gpu-mem", gpu_mem, "--disk", str(tmp_path / "kv"), "--steps", "2", "--warmup", "1",
                     "--json", str(tmp_path / "r.json")])
        assert code == 0, capsys.readouterr().err
        rows += json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["leoam", "exact", "shadowkv"]
    assert all(r["needle_recall"] == 1.0 for r in rows), [r["needle_recall"] for r in rows]
    assert all(r["tier_tokens"]["disk"] >= 0.4 * r["ctx"] for r in rows if r["policy"] != "exact")
    leoam = rows[0]
    budget_share = leoam["stats"]["budget_tokens"] / leoam["ctx"]       # 2,048 of 8K: a quarter
    assert 0 < leoam["moved_bytes_per_token"]["disk_read"] < budget_share * leoam["peak_bytes"]["disk"]
    for key in ("chunks_selected", "chunk_tokens_mean", "hit_rate", "cpu_cache_hit_rate", "disk_wait_ms_per_token"):
        assert key in leoam["stats"]


def test_needles_are_found_in_every_layer_of_a_wide_gqa_model(monkeypatch):
    """Llama-3.1-8B's attention (width 4096, four query heads per KV head): the second layer's needles are found
    too. Every head of a group must put its mass on the needles, or the first layer's output, and with it the
    second layer's queries, would differ from the probe's."""
    from localkv.bench.runner import BenchConfig, run_bench
    from localkv.bench.shapes import SHAPES

    monkeypatch.setitem(SHAPES, "wide", dict(dim=4096, n_layers=2, n_heads=32, n_kv_heads=8, ffn_dim=256,
                                             vocab_size=256))
    config = BenchConfig(ctxs=[4096], policies=["leoam"], shape="wide", budgets=[("512", 512)], gpu_mem=24 << 20,
                         cpu_mem=512 << 20, synthetic_kv=True, steps=1, warmup=1, device="cpu")
    assert [r["needle_recall"] for r in run_bench(config)["rows"]] == [1.0]


def test_disk_full_during_prefill_keeps_the_cache_consistent(tiny, tmp_path):
    """A prefill that fills the disk tier stops with a one-line disk error; the cache cut back to what it held
    before decodes as a cache that never saw the failed chunk."""
    model, args = tiny
    page_bytes = 2 * args.n_kv_heads * 32 * args.head_dim * 4
    budgets = Budgets(0, 2 * page_bytes * args.n_layers, tmp_path / "kv", 6 * page_bytes * args.n_layers)
    ids = torch.randint(0, V, (700,))
    full, clean = (make_cache("leoam", args, 1024, budgets=budgets if i == 0 else _budgets(args, tmp_path / "b", 0, 2),
                              budget=64, **OPTS) for i in range(2))
    with torch.no_grad():
        _run(model, full, ids, [0, 200], 200)
        with pytest.raises(UserError, match="disk"):
            model(ids[200:700], full)
        full.truncate(200)
        _run(model, clean, ids, [0, 200], 200)
        want = _run(model, clean, ids, [200], 230)
        got = _run(model, full, ids, [200], 230)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_dim,quant", [(24, None), (16, 8), (24, 4), (128, None)])
def test_disk_reads_by_block_equal_whole_page_reads(tmp_path, head_dim, quant):
    """The selected units' bytes cut out of disk blocks (`LayerChunks`) equal the same units read from whole pages
    (`StoreChunks`), for units that straddle 4 KB blocks (D = 24: 1,536 bytes a unit) and for quantized pages."""
    from localkv.offload.chunks import StoreChunks
    from localkv.offload.disk_codec import QuantizedPages
    from localkv.offload.pages import PageGeometry
    from localkv.offload.disk_reads import DiskBlocks, LayerChunks
    from localkv.offload.store import KVStore

    g = PageGeometry(1, 3, head_dim, 256, torch.float32)
    store = KVStore(g, Budgets(0, 0, tmp_path), torch.device("cpu"),
                    disk_codec=QuantizedPages(g, quant) if quant else None)
    n = 5 * 256
    store.write(0, 0, torch.randn(n, 3, head_dim), torch.randn(n, 3, head_dim))
    assert store.disk.used >= 4
    units = torch.stack([torch.randperm(n // UNIT)[:7] for _ in range(3)]).sort(1).values     # (Hkv, 7)
    dst = torch.arange(7).expand(3, 7).contiguous()
    for part in (0, 1):
        want, got = (torch.zeros(3, 7 * UNIT, head_dim) for _ in range(2))
        StoreChunks(store, 0, UNIT).fetch(part, units, dst, want)
        reader = DiskBlocks(store, io_threads=2, cache_bytes=1 << 20)
        LayerChunks(store, 0, UNIT, reader).fetch(part, units, dst, got)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_prefetch_the_steps_do_not_use_is_skipped_then_tried_again(tmp_path):
    """A layer whose prefetched blocks its steps never ask for stops prefetching (its reads would only compete
    with the useful ones), tries again after `PREFETCH_RETRY` skips; one whose prefetches are used keeps them."""
    from localkv.offload.pages import PageGeometry
    from localkv.offload.disk_reads import PREFETCH_RETRY, DiskBlocks
    from localkv.offload.store import KVStore

    g = PageGeometry(2, 2, 64, 256, torch.float32)
    store = KVStore(g, Budgets(0, 0, tmp_path), torch.device("cpu"))
    for layer in range(2):
        store.write(layer, 0, torch.randn(4 * 256, 2, 64), torch.randn(4 * 256, 2, 64))
    reader = DiskBlocks(store, io_threads=2, cache_bytes=1 << 16)   # 16 blocks: every step reads anew
    slots = np.zeros(8, np.int64)
    used, unused = np.arange(8), np.arange(8, 16)
    for step in range(3 + PREFETCH_RETRY):
        reader.prefetch(0, (unused, slots))      # layer 0: never what its step asks for
        reader.request(0, used, slots)
        reader.prefetch(1, (used, slots))        # layer 1: exactly what its step asks for
        reader.request(1, used, slots)
    reader.drain()
    assert reader.skipped[1] == 0 and reader.useful[1] > 0.9
    assert reader.useful[0] < 0.25 and reader.prefetches_skipped >= PREFETCH_RETRY - 1
    assert reader.prefetches > 3 + PREFETCH_RETRY   # layer 1 every step, layer 0 at first and on its retry


def test_the_estimate_counts_scattered_disk_reads(tmp_path):
    """At 1M with half the KV on disk a step's disk time is its count of unit reads, not their bytes: eight times
    the budget is about eight times the estimate, and quantized pages (K and V of a unit in one read) halve it."""
    from localkv.bench.shapes import shape_args
    from localkv.offload.planner import Bandwidths, make_plan

    args = shape_args("llama3-8b")
    kw = dict(device="cpu", kv_dtype=torch.bfloat16, weights_bytes=0, gpu_mem=6 << 30, cpu_mem=64 << 30,
              disk=tmp_path, disk_mem=200 << 30, bandwidths=Bandwidths(hbm=1e15, h2d=1e15))   # only the disk counts
    ms = {(budget, quant): make_plan(args, 1 << 20, policy="leoam", options={"budget": budget, "disk_quant": quant},
                                     **kw).ms_per_token
          for budget in (2048, 16384) for quant in (None, "int8")}
    assert 7 < ms[16384, None] / ms[2048, None] < 9
    assert 1.9 < ms[2048, None] / ms[2048, "int8"] < 2.1
