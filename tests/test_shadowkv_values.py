"""ShadowKV with ``exact_keys=False``, the store holding values only: decode as with the exact keys while the basis
is the same, half the bytes in every tier, prefill over the index's keys, truncation within the recent window
only, no session save, and the planner's half of the host memory at 1M tokens."""

import pytest
import torch

from localkv.errors import ContextOverflowError, UserError
from localkv.kernels import lowrank_rope_ref
from localkv.offload import make_cache
from test_shadowkv import OPTS, V, _budgets, _check_rollback, _greedy, _words

NO_KEYS = "shadowkv with exact_keys=False keeps no exact keys"


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")   # as in test_shadowkv.py: the step's logic, not the kernels


def test_decode_is_as_with_exact_keys_over_half_the_bytes(tiny, tmp_path):
    """The same prompt and greedy decode with and without the exact keys, over every tier: decode reads only values
    from the store, so while both run on the first block's basis the logits agree to rounding (the values-only
    cache projects that block from the keys in hand, the other un-rotates them from the store). The values-only
    cache asks for a refresh at every block (refresh_error=0) and the rule is off: its basis stays. The store with
    the exact keys gets twice the GPU bytes and room for everything in CPU memory, and caches values on the GPU
    (`KVStore.gpu_values`): twice the pages of the values-only store, whose older pages go to CPU and disk. The
    same chunks are selected and hit, and as many values fetched, more of them from the GPU."""
    model, args = tiny
    caches = [make_cache("shadowkv", args, 2048, budgets=_budgets(args, tmp_path / f"p{parts}", 2 * parts,
                                                                  3 if parts == 1 else 200, 32, 1),
                         exact_keys=parts == 2, **dict(OPTS, refresh_error=1e9 if parts == 2 else 0.0))
              for parts in (2, 1)]
    prompt = torch.randint(0, V, (int(torch.randint(250, 400, ())),))
    with torch.no_grad():   # one prefill chunk: nothing before it to attend to, then decode past seals and blocks
        runs = [_greedy(model, c, model(prompt, c, all_logits=True), 200) for c in caches]
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-4)
    a, b = (c.stats() for c in caches)
    assert caches[0].store.gpu_values and not caches[1].store.gpu_values
    open_tokens = a["gpu_tokens"]                                 # a's GPU tier is no page's home
    assert a["gpu_value_tokens"] - open_tokens == 2 * (b["gpu_tokens"] - open_tokens) > 0
    assert a["cpu_tokens"] == b["gpu_tokens"] + b["cpu_tokens"] + b["disk_tokens"] - open_tokens
    for key in ("chunks_selected", "hit_rate"):
        assert b[key] == a[key], key
    fa, fb = a["fetched_bytes_per_token"], b["fetched_bytes_per_token"]
    assert sum(fa.values()) == pytest.approx(sum(fb.values())) and fa["device"] > fb["device"]
    assert b["disk_tokens"] > 0 and b["fetched_bytes_per_token"]["disk"] > 0
    assert a["basis_refreshes"] == b["basis_refreshes"] == args.n_layers   # the first block's SVD, nothing after
    assert b["basis_fixed"] and not b["exact_keys"] and a["exact_keys"] and not a["basis_fixed"]
    assert all(c.store.open.shape[1] == parts for c, parts in zip(caches, (2, 1)))


def test_prefill_sees_the_prefix_through_the_index(tiny, tmp_path, monkeypatch):
    """A prefill chunk after the first attends to the stored prefix with the keys decode would use: at full rank
    and budget that is exact attention, through chunked prefill, decode, and older chunks becoming outliers (their
    keys rebuilt). At rank 8 the prefix's keys are exact where the layer holds them (sink, outliers, recent window)
    and rebuilt from U and SV elsewhere."""
    from localkv.offload.policies.shadowkv.layer import ShadowKVLayer

    late = []   # outlier chunks chosen after they were sealed and not held: their exact keys were gone
    real = ShadowKVLayer._outlier_kv

    def outlier_kv(self, ids, uk, uv, first):
        held = (ids[:, :, None] == self.index.outliers[:, None, :]).any(-1) | (ids >= first // self.C)
        late.append(int((~held).sum()))
        return real(self, ids, uk, uv, first)

    monkeypatch.setattr(ShadowKVLayer, "_outlier_kv", outlier_kv)
    model, args = tiny
    ids = torch.randint(0, V, (650,))
    ref = make_cache("exact", args, 1024)
    got = make_cache("shadowkv", args, 1024, budgets=_budgets(args, tmp_path, 2, 3, 32, parts=1), exact_keys=False,
                     budget=1.0, rank=args.n_kv_heads * args.head_dim, page_tokens=32, window_tokens=48,
                     block_tokens=64, outlier_fraction=0.1, min_outliers=1)
    with torch.no_grad():
        outs = [torch.cat([model(ids[:200], c, all_logits=True), model(ids[200:450], c, all_logits=True),
                           *(model(ids[t:t + 1], c, decode=True) for t in range(450, 650))]) for c in (ref, got)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert sum(late) > 0 and got.stats()["disk_tokens"] > 0

    cache = make_cache("shadowkv", args, 1024, exact_keys=False, measure_recall=True, **OPTS)
    with torch.no_grad():
        model(ids[:300], cache)
        model(ids[300:400], cache)
    lay = cache.layers[0]
    C, W, n = lay.C, lay.W, lay.n
    held, exact = lay._held_keys(0, n), lay.all_k[:, :n]           # (Hkv, n, D) rotated
    kept = torch.zeros(lay.Hkv, n, dtype=torch.bool)
    kept[:, :lay.sink_rows] = kept[:, W:] = True
    for h in range(lay.Hkv):
        for c in lay.index.outliers[h].tolist():
            kept[h, c * C:(c + 1) * C] = True
    assert 0 < int(kept[:, :W].sum()) < kept[:, :W].numel()
    assert torch.equal(held[kept], exact[kept])
    ids_sealed = torch.arange(W // C).expand(lay.Hkv, -1)
    rebuilt = lowrank_rope_ref(lay.lowrank.u, lay.lowrank.sv, ids_sealed, cache.tables.cos, cache.tables.sin,
                               torch.empty(lay.Hkv, W, lay.D))
    torch.testing.assert_close(held[:, :W][~kept[:, :W]], rebuilt[~kept[:, :W]])
    assert (held - exact)[~kept].abs().max() > 1e-2                 # rank 8 of 32 columns: not the exact keys


def test_truncate_within_the_window_and_refuse_behind_it(tiny):
    """Rollbacks that drop only recent-window tokens (whose exact keys the dense buffer holds) continue as a run
    that never had the dropped tokens: across page seals and block ends, and back into the first block (whose keys
    the basis keeps). A cut behind a seal of the window raises a one-line UserError and changes nothing."""
    model, args = tiny
    mk = lambda: make_cache("shadowkv", args, 2048, exact_keys=False, **dict(OPTS, window_tokens=1024))  # noqa: E731
    a, b = mk(), mk()
    toks = torch.randint(0, V, (410,))
    with torch.no_grad():
        for c in (a, b):
            model(toks[:20], c)                     # 20 tokens: nothing sealed, the whole prefix in the window
        for t in toks[20:100]:
            model(t[None], a, decode=True)          # past the first block (64): its basis made for good
        a.truncate(30)                              # back into the first block
        for t in toks[20:30]:
            model(t[None], b, decode=True)
        _check_rollback(model, a, b, toks, range(30, 250, 2))   # speculative rollback: decode 4, keep 1
        assert not a.layers[0].seal_log and a.layers[0].lowrank.fixed
        for c in (a, b):
            model(toks[250:400], c, all_logits=True)   # a prefill seals the window at 400 tokens
        for t in toks[400:403]:
            model(t[None], a, decode=True)
        with pytest.raises(UserError, match=f"^{NO_KEYS}: it cannot go back to 390 tokens") as e:
            a.truncate(390)
        assert "\n" not in str(e.value) and a.length == 403 and all(lay.n == 403 for lay in a.layers)
        a.truncate(400)                             # back to the seal, not behind it: fine
        want, got = ([model(t[None], c, decode=True) for t in toks[400:410]] for c in (b, a))
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-4, atol=1e-4)


def test_no_session_save_nor_export(tiny_llm, tmp_path):
    """Saving a chat (or exporting its KV for another policy) refuses in one line, before writing anything."""
    import localkv
    from localkv.runtime import Engine

    engine = Engine(tiny_llm.loaded, ctx_tokens=4096, policy="shadowkv", exact_keys=False, **OPTS)
    chat = localkv.LLM(tiny_llm.loaded, engine).chat()
    "".join(e.text for e in chat.send(_words(200), max_tokens=8))
    with pytest.raises(UserError, match=f"^{NO_KEYS}: its KV cannot be saved as a session") as e:
        chat.save(tmp_path / "session")
    assert "\n" not in str(e.value) and not (tmp_path / "session").exists()
    cache = chat.session.seq.cache
    for export in (lambda: cache.export_pages(0, cache.length, 256), lambda: cache.token_runs(0, cache.length)):
        with pytest.raises(UserError, match=NO_KEYS):
            export()


def test_synthetic_fill_stores_no_keys(tiny):
    """The bench's KV synthesis goes through `load_tokens`: values land in the store, keys only in the index."""
    from localkv.bench.synthetic import synth_fill

    model, args = tiny
    cache = make_cache("shadowkv", args, 4096, exact_keys=False, **OPTS)
    synth_fill(cache, args, 3000, device="cpu", dtype=torch.float32, chunk=1024)
    g = cache.store.geometry
    assert g.parts == 1 and cache.store.stats()["gpu_bytes"] == (3000 // 32 + 1) * args.n_layers * g.page_bytes
    assert cache.length == 3000 and cache.layers[0].lowrank.rows == 3000
    with torch.no_grad():
        out = model(torch.randint(0, V, (1,)), cache, decode=True)
    assert torch.isfinite(out).all() and cache.stats()["chunks_selected"] > 0


def test_planner_counts_values_only(monkeypatch):
    """1M tokens of Llama-3.1-8B beside a 24 GB card's ~6 GB of KV room: 137 GB of K and V, 68.7 GB of V alone,
    which fits in 100 GB of pinned memory with the host index beside it, where K and V do not."""
    from localkv.bench.shapes import shape_args
    from localkv.offload import planner
    from localkv.offload.planner import make_plan

    monkeypatch.setattr(planner, "machine_budgets", lambda *a: (0, 0, 0))
    args = shape_args("llama3-8b")
    kw = dict(policy="shadowkv", device="cuda", kv_dtype=torch.bfloat16, weights_bytes=0, gpu_mem=6 * 2**30,
              cpu_mem=100 * 2**30)
    plan = make_plan(args, 1 << 20, options={"exact_keys": False}, **kw)
    assert plan.kv_bytes_per_token * (1 << 20) == pytest.approx(68.7e9, rel=1e-3)
    assert plan.gpu.tokens + plan.cpu.tokens == 1 << 20 and plan.disk.tokens == 0 and plan.policy_options["index_tier"] == "cpu"
    assert 60e9 < plan.cpu.bytes < 68.7e9 and any("values only" in note for note in plan.notes)
    both = make_plan(args, 1 << 20, disk="/tmp/unused", disk_mem=100 * 2**30, **kw)
    assert both.kv_bytes_per_token == 2 * plan.kv_bytes_per_token and both.disk.tokens > 0
    with pytest.raises(ContextOverflowError, match="every tier.*exact_keys=false"):   # the way out, named
        make_plan(args, 1 << 20, **kw)
    with pytest.raises(UserError, match="unknown shadowkv option"):
        make_plan(args, 1 << 20, options={"exact_key": False}, **kw)


def test_values_only_store_budgets_default_to_half(tiny):
    """Without budgets (the context whole on the device) the store is sized for values alone."""
    _, args = tiny
    a, b = (make_cache("shadowkv", args, 1024, exact_keys=e, **OPTS) for e in (True, False))
    assert a.store.budgets.gpu_bytes == 2 * b.store.budgets.gpu_bytes > 0


def test_planner_gives_the_exact_keys_store_a_gpu_tier_of_values():
    """128K of Llama-3.1-8B, 8 GB of GPU room and 64 GB of CPU memory: the context spills past the GPU, so the store
    with the exact keys caches values there (as many tokens as the values-only store's GPU tier holds), with every
    token's K and V in CPU memory; with room for none of it below, the GPU tier keeps pages of K and V."""
    from localkv.bench.shapes import shape_args
    from localkv.offload.planner import make_plan

    args = shape_args("llama3-8b")
    kw = dict(policy="shadowkv", device="cpu", kv_dtype=torch.bfloat16, weights_bytes=0, gpu_mem=8 * 2**30)
    plan = make_plan(args, 128 * 1024, cpu_mem=64 * 2**30, **kw)
    values = make_plan(args, 128 * 1024, cpu_mem=64 * 2**30, options={"exact_keys": False}, **kw)
    assert 0 < plan.gpu.tokens == values.gpu.tokens < 128 * 1024 and plan.gpu.bytes == values.gpu.bytes
    assert plan.cpu.tokens == 128 * 1024 and plan.tiered and any("caches the values" in n for n in plan.notes)
    pages = make_plan(args, 128 * 1024, cpu_mem=12 * 2**30, **kw)          # K and V do not fit below the GPU
    assert pages.gpu.tokens + pages.cpu.tokens == 128 * 1024 and pages.gpu.tokens * 2 < plan.gpu.tokens + 2
    assert not any("caches the values" in n for n in pages.notes)
