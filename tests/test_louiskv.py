"""The LouisKV policy: exact with the whole context in its budget (device, CPU and disk pages; clustered input,
output segments, truncation behind seals, 2,000 generated tokens), a scattered needle gathered into one cluster,
the trigger (reused steps move nothing), sessions in position order, calibration, and the planner."""

import pytest
import torch

from localkv.errors import UserError
from localkv.offload import make_cache
from localkv.offload.policies.louiskv.index import UNIT, cluster_order, segment_units
from localkv.offload.store import Budgets
from policy_runs import run as _run, tier_budgets as _budgets

V = 100  # vocabulary of the tiny model
OPTS = dict(sink_tokens=16, window_tokens=16, cluster_tokens=64, output_tokens=32, max_segment_tokens=48,
            page_tokens=32)


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    """The torch references on the CPU (the kernels have their own tests under tests/kernels)."""
    monkeypatch.setenv("LOCALKV_KERNELS", "ref")




def test_full_budget_equals_exact_over_cpu_and_disk_pages(tiny, tmp_path):
    """Every sealed unit selected: the logits of exact through prefill (clusters written in cluster order), decode
    (generated tokens sealed as segments), a second prompt after generated tokens, and truncation back behind
    seals, with units read from CPU and disk pages; sessions export the tokens in position order."""
    model, args = tiny
    ids = torch.randint(0, V, (520,))
    ref = make_cache("exact", args, 1024)
    got = make_cache("louiskv", args, 1024, budgets=_budgets(args, tmp_path, 0, 3), budget=1.0, tau=0.9,
                     max_reuse=4, **OPTS)
    outs = []
    with torch.no_grad():
        for cache in (ref, got):
            out = [_run(model, cache, ids, [0, 150, 300], 400), _run(model, cache, ids, [400, 470], 490)]
            cache.truncate(231)   # into a clustered group: its kept tokens come back to the window, in order
            out += [_run(model, cache, ids, [231, 240], 300)]
            outs.append(torch.cat(out))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for layer in range(args.n_layers):
        for a, b in zip(ref.export_pages(layer, 300, 64), got.export_pages(layer, 300, 64)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)   # the order restored, every token there
    s = got.stats()
    assert s["disk_tokens"] > 0 and s["moved_bytes_per_token"]["disk_read"] > 0 and s["moved_bytes_per_token"]["cpu"]
    assert s["clusters"] > 0 and s["segments"] > 0 and 0 < s["retrieval_rate"] <= 1 and 0 < s["hit_rate"] < 1
    assert s["policy"] == "louiskv" and s["budget_tokens"] == 300 and s["tau"] == 0.9
    for key in ("units_selected", "gpu_tokens", "moved_bytes", "index_device_bytes", "disk_wait_ms_per_token"):
        assert key in s


def test_a_scattered_needle_is_one_cluster(tiny):
    """Synthetic KV: 16 tokens scattered over a 256-token group have keys along one direction. k-means puts them in
    one cluster, stored as one unit, so a budget of one unit attends to all of them and nothing else."""
    _, args = tiny
    Hkv, D, G = args.n_kv_heads, args.head_dim, args.n_heads // args.n_kv_heads
    cache = make_cache("louiskv", args, 2048, budget=16, measure_recall=True,
                       **{**OPTS, "cluster_tokens": 256})
    n = 16 + 256 * 3 + 16
    keys, values = torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)
    direction = torch.nn.functional.normalize(torch.randn(Hkv, D), dim=-1)
    needle = 16 + 256 + torch.randperm(256)[:16].sort().values     # scattered over group 1
    keys[needle] = 8 * direction + 0.1 * torch.randn(16, Hkv, D)
    layer = cache.layer(0)
    layer.load(cache.reserve(n), keys, values)                     # the session path: rotated keys as they are
    assert layer.W == n - 16 and [p[:3] for p in layer.pieces] == [(16 + 256 * i, 16 + 256 * (i + 1), True)
                                                                    for i in range(3)]
    q = (8 * direction).repeat_interleave(G, 0)[None]              # (1, Hq, D)
    with torch.inference_mode():
        layer._retrieve(q)
        layer._attend(q)
    covered = layer.covered(layer.sel, layer.W, layer.n)
    assert covered[:, 16:n - 16].sum(1).tolist() == [16] * Hkv and covered[:, needle].all()
    assert cache.stats()["attention_recall"] > 0.9


def test_cluster_order_gives_each_cluster_whole_units():
    """Rows in cluster order: each k-means cluster's whole units first (one cluster a unit), its remainder after,
    in cluster order; the permutation covers every token once. Segments start at the boundaries and are cut at the
    longest."""
    from localkv.kernels import kmeans

    keys = torch.randn(2, 256, 8)
    keys[:, torch.randperm(256)[:96]] += 3.0          # two families of keys, scattered
    perm = cluster_order(keys, iters=6)
    _, assign = kmeans(keys, 256 // UNIT, iters=6)      # the clusters it ordered by (k-means is deterministic)
    for h in range(2):
        assert sorted(perm[h].tolist()) == list(range(256))
        cluster = assign[h][perm[h]]
        size = torch.bincount(assign[h], minlength=16)
        whole = int((size // UNIT).sum()) * UNIT
        units = cluster[:whole].view(-1, UNIT)
        assert (units == units[:, :1]).all()                               # a unit holds one cluster
        assert (torch.bincount(units[:, 0], minlength=16) == size // UNIT).all()
        assert (cluster[whole:].diff() >= 0).all()                          # the remainders, in cluster order
    assert segment_units(0, 160, [37, 90], max_units=3) == [2, 3, 3, 2]
    assert segment_units(32, 96, [], max_units=2) == [2, 2]


def test_reused_steps_move_nothing(tiny, tmp_path):
    """tau under every similarity: a step retrieves only when the reuse span runs out; the steps between fetch
    nothing and score nothing. tau above every similarity: every step retrieves."""
    model, args = tiny
    ids = torch.randint(0, V, (360,))
    rates = []
    for tau in (-2.0, 2.0):
        cache = make_cache("louiskv", args, 1024, budgets=_budgets(args, tmp_path / str(tau), 0, 3), budget=64,
                           tau=tau, max_reuse=3, cache_factor=1.0, **OPTS)
        with torch.no_grad():
            _run(model, cache, ids, [0, 300], 301)                # the first step retrieves (the selection is void)
            moved = cache.moved.clone()
            for t in range(301, 304):                                # the next three reuse it
                model(ids[t:t + 1], cache, decode=True)
                if tau < 0:
                    assert torch.equal(cache.moved, moved) and cache.retrievals == args.n_layers
            _run(model, cache, ids, [304], 360)
        rates.append(cache.stats()["retrieval_rate"])
    assert rates[0] == pytest.approx(1 / 4, abs=0.02) and rates[1] == 1.0


def test_two_thousand_generated_tokens_move_between_tiers(tiny, tmp_path):
    """2,000 decoded tokens: the generated KV is cut into segments that leave the device buffer for the CPU and
    disk tiers, the window stays small, most steps reuse their selection, and attention reaches the old output."""
    model, args = tiny
    ids = torch.randint(0, V, (2100,))
    cache = make_cache("louiskv", args, 2200, budgets=_budgets(args, tmp_path, 2, 20), budget=64, tau=-1.0,
                       max_reuse=8, measure_recall=True, **OPTS)
    with torch.no_grad():
        out = _run(model, cache, ids, [0, 100], 2100)
    assert out.shape == (2100, V) and torch.isfinite(out).all()
    s, layer = cache.stats(), cache.layers[0]
    assert s["segments"] >= 1900 / OPTS["max_segment_tokens"] and layer.n - layer.W <= OPTS["output_tokens"] + 8 + UNIT
    assert s["cpu_tokens"] > 0 and s["disk_tokens"] > 1000 and s["moved_bytes_per_token"]["disk"] > 0
    assert s["retrieval_rate"] == pytest.approx(1 / 9, abs=0.01) and 0 < s["attention_recall"] < 1
    sel = layer.sel
    assert sel is not None and int(sel.min()) * UNIT < 1000    # some selected units are old generated tokens


def test_multi_turn_chat_edit_and_resume_as_with_exact(tiny_llm, tmp_path):
    """An edited last turn and a resumed session answer as a chat that never had the edited turn or never stopped
    (full budget: the answers must be exact's; KV over device, CPU and disk tiers)."""
    import localkv
    from localkv.runtime import Engine

    args = tiny_llm.args
    page_bytes = 2 * args.n_kv_heads * 32 * args.head_dim * 4 * args.n_layers
    answers = []
    for policy, opts in (("exact", {}), ("louiskv", dict(OPTS, budget=1.0))):
        engine = Engine(tiny_llm.loaded, ctx_tokens=4096, policy=policy,
                        budgets=Budgets(2 * page_bytes, 3 * page_bytes, tmp_path / policy), **opts)
        llm = localkv.LLM(tiny_llm.loaded, engine)
        say = lambda chat, text: "".join(e.text for e in chat.send(text, max_tokens=24))  # noqa: E731
        torch.manual_seed(0)
        vocab = "the quick brown fox jumps over lazy dog Paris capital France long context models".split()
        words = lambda n: " ".join(vocab[i] for i in torch.randint(len(vocab), (n,)).tolist())  # noqa: E731
        a = llm.chat()
        t1, t2, t3, t4 = words(300), words(200), words(150), words(80)
        got = [say(a, t1)]
        say(a, t2)
        a.session.messages = a.messages[:2]                # edit: the second turn is replaced
        got.append(say(a, t3))
        a.save(tmp_path / f"session-{policy}")
        c = llm.load_session(tmp_path / f"session-{policy}")
        got += [say(c, t4), say(a, t4)]
        assert c.last.prompt_tokens == a.last.prompt_tokens
        answers.append(got)
    assert answers[1] == answers[0] and answers[1][2] == answers[1][3]


def test_calibration_is_stored_and_used_by_the_engine(tiny_llm, tmp_path, monkeypatch):
    """`eval.calibrate` fits a tau per layer at the chosen retrieval share and stores it beside the model; a new
    engine reads it as the policy's default, an explicit option wins; eval rows report the retrieval rate."""
    from localkv.eval import calibrate, fidelity
    from localkv.models import calibration
    from localkv.runtime import Engine

    monkeypatch.setenv("LOCALKV_HOME", str(tmp_path))
    ids = torch.randint(0, 200, (400,)).tolist()
    fitted = calibrate(tiny_llm, ids, 300, 80, ["exact", "louiskv"])
    assert list(fitted) == ["louiskv"]
    opts, path = fitted["louiskv"]
    assert path.is_file() and len(opts["tau"]) == tiny_llm.args.n_layers
    assert calibration.options(tiny_llm.loaded.source, "louiskv") == opts
    engine = Engine(tiny_llm.loaded, ctx_tokens=1024, policy="louiskv")
    seq = engine.new_sequence()
    assert seq.cache.tau == opts["tau"]
    assert Engine(tiny_llm.loaded, ctx_tokens=1024, policy="louiskv", tau=0.5).new_sequence().cache.tau == [0.5] * 2
    engine.prefill(seq, ids[:300])
    for t in ids[300:380]:
        engine.decode_one(seq, t)
    rate = seq.cache.stats()["retrieval_rate"]
    assert 0.1 < rate < 0.45       # 15% of the steps under tau, plus forced refreshes
    rows = fidelity(tiny_llm, ids, [300], 40, ["louiskv"], [("1/4", 0.25)])
    assert 0 < rows[0]["retrieval_rate"] < 1 and 0 <= rows[0]["kl"] and 0 < rows[0]["attention_recall"] <= 1


def test_options_are_checked(tiny):
    _, args = tiny
    with pytest.raises(UserError, match="unknown louiskv option"):
        make_cache("louiskv", args, 256, budgt=3)
    with pytest.raises(UserError, match="multiple of 16"):
        make_cache("louiskv", args, 256, cluster_tokens=40)
    with pytest.raises(UserError, match="tau has 3 values"):
        make_cache("louiskv", args, 256, tau=[0.5, 0.6, 0.7])


def test_planner_counts_the_centroids(tmp_path, capsys):
    """`localkv plan --policy louiskv` runs; at 1M the centroids, unit cache and window come off a 24 GB card's
    budget before any page, and the disk's pages go int8 where they fit only so."""
    from localkv.bench.shapes import shape_args
    from localkv.cli import main
    from localkv.offload.planner import make_plan
    from localkv.offload.policies.louiskv.cache import plan_bytes

    args = shape_args("llama3-8b")
    gpu, centroids, step = plan_bytes(args, 1 << 20, 2)
    assert centroids == (1 << 20) // 16 * 1024 * 2 * 32 and step == (1 << 14) * 2 * 1024 * 2 * 32
    assert gpu > centroids + 2 * step        # the unit cache holds two budgets by default
    plan = make_plan(args, 1 << 20, policy="louiskv", device="cpu", kv_dtype=torch.bfloat16, weights_bytes=0,
                     gpu_mem=8 << 30, disk=tmp_path, disk_mem=80 << 30)   # a CPU: device memory, then disk
    assert plan.policy_options == {"cache_factor": 1.0, "disk_quant": "int8"} and plan.disk.tokens > 0.9 * (1 << 20)
    assert main(["plan", "--policy", "louiskv", "--ctx", "32K"]) == 0
    assert "louiskv" in capsys.readouterr().out


def test_disk_full_during_prefill_keeps_the_cache_consistent(tiny, tmp_path):
    """A prefill whose seals fill the disk tier stops with a one-line disk error; the cache cut back to what it held
    before decodes as a cache that never saw the failed chunk (full budget: both must be exact's)."""
    model, args = tiny
    page_bytes = 2 * args.n_kv_heads * 32 * args.head_dim * 4
    budgets = Budgets(0, 2 * page_bytes * args.n_layers, tmp_path / "kv", 6 * page_bytes * args.n_layers)
    ids = torch.randint(0, V, (700,))
    full, clean = (make_cache("louiskv", args, 1024, budget=1.0, **OPTS,
                              budgets=budgets if i == 0 else _budgets(args, tmp_path / "b", 0, 2)) for i in range(2))
    with torch.no_grad():
        _run(model, full, ids, [0, 200], 200)
        with pytest.raises(UserError, match="disk"):
            model(ids[200:700], full)
        full.truncate(200)
        _run(model, clean, ids, [0, 200], 200)
        want = _run(model, clean, ids, [200], 230)
        got = _run(model, full, ids, [200], 230)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
