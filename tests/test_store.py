"""The tiered store: exact attention however the KV is spread over GPU / CPU / disk, truncate, faults."""

import pytest
import torch

from localkv.offload import make_cache
from localkv.offload.disk import DiskFullError, DiskTier
from localkv.offload.pages import PageGeometry
from localkv.offload.store import Budgets, KVStore
from test_model import _hf_and_ours


def _budgets(args, tmp_path, gpu_pages, cpu_pages, page, disk=True, disk_pages=None):
    page_bytes = 2 * args.n_kv_heads * page * args.head_dim * 4
    return Budgets(page_bytes * args.n_layers * gpu_pages, page_bytes * args.n_layers * cpu_pages,
                   tmp_path if disk else None,
                   None if disk_pages is None else page_bytes * args.n_layers * disk_pages)


@pytest.mark.parametrize("gpu_pages,cpu_pages", [(100, 0), (0, 100), (0, 0), (2, 3)])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiered_matches_in_memory(tmp_path, gpu_pages, cpu_pages, model_type):
    _, model, args = _hf_and_ours(model_type)
    page = 16
    ids = torch.randint(0, 100, (300,))
    ref = make_cache("exact", args, 512)
    got = make_cache("exact", args, 512, budgets=_budgets(args, tmp_path, gpu_pages, cpu_pages, page),
                     page_tokens=page, block_pages=4, ring_blocks=2)
    with torch.no_grad():
        for cache, out in ((ref, []), (got, [])):
            out.append(model(ids[:100], cache, all_logits=True))
            out.append(model(ids[100:250], cache, all_logits=True))
            out += [model(ids[t:t + 1], cache, decode=True) for t in range(250, 262)]
            cache.truncate(123)  # drop a tail that ends inside a page, then go on from there
            out.append(model(ids[200:260], cache, all_logits=True))
            cache.out = out
    for a, b in zip(ref.out, got.out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    stats = got.stats()
    if gpu_pages == cpu_pages == 0:
        assert stats["disk_tokens"] > 0 and stats["moved_bytes"]["disk_read"] > 0


def test_pages_are_written_to_disk_once(tmp_path):
    _, model, args = _hf_and_ours("llama")
    cache = make_cache("exact", args, 1024, budgets=_budgets(args, tmp_path, 1, 1, 16), page_tokens=16)
    with torch.no_grad():
        model(torch.randint(0, 100, (400,)), cache)
        for t in range(5):
            model(torch.randint(0, 100, (1,)), cache, decode=True)
    store = cache.store
    disk_pages = sum(e.disk >= 0 for layer in store.pages for e in layer)
    assert store.moved.disk_write == disk_pages * store.geometry.page_bytes


def test_reading_a_page_from_disk_counts_its_bytes(tmp_path):
    """A page read back through `read_page` (truncation, sessions, a sparse policy's chunks on disk) is
    counted in ``moved.disk_read``; pages already on the device cost nothing."""
    _, model, args = _hf_and_ours("llama")
    cache = make_cache("exact", args, 1024, budgets=_budgets(args, tmp_path, 1, 1, 16), page_tokens=16)
    with torch.no_grad():
        model(torch.randint(0, 100, (200,)), cache)
    store = cache.store
    on_disk = [i for i, e in enumerate(store.pages[0]) if e.tier == "disk"]
    on_gpu = [i for i, e in enumerate(store.pages[0]) if e.tier == "gpu"]
    assert on_disk and on_gpu
    before = store.moved.disk_read
    store.read_page(0, on_gpu[0])
    assert store.moved.disk_read == before
    page = store.read_page(0, on_disk[-1])
    assert store.moved.disk_read == before + store.geometry.page_bytes
    assert page.shape == store.geometry.page_shape


def test_disk_budget_full_is_a_clear_error(tmp_path):
    _, model, args = _hf_and_ours("llama")
    cache = make_cache("exact", args, 1024, budgets=_budgets(args, tmp_path, 1, 1, 16, disk_pages=4),
                       page_tokens=16)
    with pytest.raises(DiskFullError, match="disk tier"), torch.no_grad():
        model(torch.randint(0, 100, (400,)), cache)
    assert cache.length == 0  # the failed chunk was not committed


def test_no_disk_and_no_room_is_an_overflow(tmp_path):
    from localkv.errors import ContextOverflowError

    _, model, args = _hf_and_ours("llama")
    cache = make_cache("exact", args, 1024, budgets=_budgets(args, tmp_path, 1, 1, 16, disk=False), page_tokens=16)
    with pytest.raises(ContextOverflowError, match="--disk"), torch.no_grad():
        model(torch.randint(0, 100, (200,)), cache)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_overflow_names_every_tier_budget(device, monkeypatch, tmp_path):
    """The overflow message gives each tier's budget under the names the plan table and the chat app use: the
    first tier is "GPU", the compute device's memory (the machine's RAM without a GPU)."""
    from localkv.bench.shapes import shape_args
    from localkv.errors import ContextOverflowError
    from localkv.offload import planner
    from localkv.offload.planner import make_plan

    gpu, cpu, disk = (int(torch.randint(1, 64, ())) << 30 for _ in range(3))
    monkeypatch.setattr(planner, "machine_budgets", lambda *a: (gpu, cpu, disk))   # no CUDA needed to plan for it
    with pytest.raises(ContextOverflowError, match="more than every tier") as err:
        make_plan(shape_args("llama3-8b"), 1 << 30, device=device, weights_bytes=0, gpu_mem=gpu, cpu_mem=cpu,
                  disk=str(tmp_path), disk_mem=disk)
    where = str(err.value).split("hold (")[1].split(")")[0]
    assert where == f"GPU {gpu >> 30}.0 GB, CPU {cpu >> 30}.0 GB, disk {disk >> 30}.0 GB", where


def test_enospc_from_the_file_system(tmp_path, monkeypatch):
    import errno
    import os

    g = PageGeometry(2, 2, 8, 16, torch.float32)
    disk = DiskTier(g, tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DiskFullError, match="disk full"):
        disk.write(0, torch.randn(g.page_shape))
    assert disk.used == 0


def test_disk_pages_round_trip_and_detect_corruption(tmp_path):
    g = PageGeometry(3, 2, 8, 16, torch.bfloat16)
    disk = DiskTier(g, tmp_path)
    pages = [torch.randn(g.page_shape).to(torch.bfloat16) for _ in range(4)]
    slots = [disk.write(i % 3, p) for i, p in enumerate(pages)]
    for i, (p, s) in enumerate(zip(pages, slots)):
        out = torch.empty(g.page_shape, dtype=torch.bfloat16)
        disk.read_into(i % 3, s, out, verify=True)
        assert torch.equal(out, p)
    with open(disk.path(0), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(Exception, match="corrupt"):
        disk.read_into(0, slots[0], torch.empty(g.page_shape, dtype=torch.bfloat16), verify=True)


def test_unwritable_disk_dir_fails_before_work(tmp_path):
    from localkv.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    g = PageGeometry(2, 2, 8, 16, torch.float32)
    with pytest.raises(UserError, match="not writable"):
        KVStore(g, Budgets(0, 0, blocker / "kv"), torch.device("cpu"))


def test_host_that_cannot_pin_is_a_clear_error(monkeypatch):
    """cudaHostAlloc failing (the host has no room to pin) becomes a one-line ContextOverflowError naming the
    size and what it was for, for the store's CPU pages and ShadowKV's host index alike."""
    from localkv.errors import ContextOverflowError
    from localkv.offload import pages
    from localkv.offload.policies.shadowkv.index import index_zeros

    real_empty = torch.empty

    def failing_empty(*shape, **kw):
        if kw.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")
        return real_empty(*shape, **kw)

    monkeypatch.setattr(pages.torch, "empty", failing_empty)
    geometry = PageGeometry(2, 2, 64, 256, torch.float32)
    pool = pages.PagePool(geometry, 4, torch.device("cpu"), pin=True, arena_pages=4)
    with pytest.raises(ContextOverflowError, match=r"^could not pin 1\.0 MB of CPU memory for KV pages "
                                                   r"\(CUDA error: out of memory\); lower --ctx or --cpu-mem$"):
        pool.alloc(0)
    with pytest.raises(ContextOverflowError, match=r"for shadowkv landmarks"):   # U and landmarks' allocator
        index_zeros((2, 64, 64), torch.bfloat16, torch.device("cpu"), True, "shadowkv landmarks")


def test_values_only_pages_round_trip_through_every_tier(tmp_path):
    """A store of values only (``parts=1``, ShadowKV's ``exact_keys=False``): V written in pieces lands in GPU,
    CPU and disk pages and reads back from each, K is never kept, truncation brings a cut page back from any tier,
    and every tier holds half the bytes of a K+V store with the same pages."""
    from localkv.offload.pages import KEYS, VALUES

    both, values = (PageGeometry(2, 2, 8, 16, torch.float32, parts=p) for p in (2, 1))
    assert values.page_shape == (1, 2, 16, 8) and 2 * values.page_bytes == both.page_bytes
    assert values.part_index(VALUES) == 0 and both.part_index(VALUES) == 1 and both.part_index(KEYS) == 0
    with pytest.raises(ValueError, match="values only"):
        values.part_index(KEYS)
    stores = {}
    n = 16 * 9 + 5
    k, v = torch.randn(2, n, 2, 8), torch.randn(2, n, 2, 8)    # per layer (T, Hkv, D)
    for g in (both, values):
        store = KVStore(g, Budgets(2 * 2 * g.page_bytes, 3 * 2 * g.page_bytes, tmp_path), torch.device("cpu"))
        for layer in range(2):
            for a in range(0, n, 23):
                store.write(layer, a, k[layer, a:a + 23] if g.parts == 2 else None, v[layer, a:a + 23])
        stores[g.parts] = store
    store = stores[1]
    assert {e.tier for e in store.pages[1]} == {"gpu", "cpu", "disk"} and store.open.shape[1] == 1
    for layer in range(2):
        for index in range(len(store.pages[layer])):
            page = store.read_page(layer, index)                  # (1, Hkv, P, D)
            assert page.shape == values.page_shape
            assert torch.equal(page[0], v[layer, index * 16:(index + 1) * 16].transpose(0, 1))
    a, b = stores[2].stats(), store.stats()
    for key in ("gpu_bytes", "cpu_bytes", "disk_bytes"):
        assert b[key] * 2 == a[key] > 0, key
    assert b["moved_bytes"]["disk_write"] * 2 == a["moved_bytes"]["disk_write"]
    cut_tiers = set()
    for cut in (16 * 8 + 3, 16 * 5 + 9, 7):
        cut_tiers.add(store.pages[0][cut // 16].tier)
        store.truncate(cut)
        assert torch.equal(store.open_page(0)[0, :, :cut % 16], v[0, cut // 16 * 16:cut].transpose(0, 1))
        store.write(0, cut, None, v[0, cut:cut + 40])             # and on from there
        assert torch.equal(store.read_page(0, cut // 16)[0], v[0, cut // 16 * 16:cut // 16 * 16 + 16].transpose(0, 1))
        store.truncate(cut)
    assert cut_tiers == {"gpu", "cpu", "disk"}                    # a cut page came back from each tier


def test_gpu_tier_of_values_caches_the_newest_values_above_every_page_home(tmp_path):
    """``gpu_values=True``: every sealed page's K and V live in the CPU tier or on disk, its home; the GPU tier holds
    copies of the values of the newest pages, twice the pages its budget would hold of K and V, and drops the oldest
    copy when full. Keys are read from the home, values from the copy; truncation and a cut page still work."""
    from localkv.offload.pages import KEYS, VALUES

    g = PageGeometry(2, 2, 8, 16, torch.float32)
    store = KVStore(g, Budgets(2 * 2 * g.page_bytes, 3 * 2 * g.page_bytes, tmp_path), torch.device("cpu"),
                    gpu_values=True)
    assert store.gpu_values and store.gpu.geometry.parts == 1 and store.gpu.pages_per_layer == 4
    n = 16 * 9 + 5
    k, v = torch.randn(2, n, 2, 8), torch.randn(2, n, 2, 8)
    for layer in range(2):
        for a in range(0, n, 23):
            store.write(layer, a, k[layer, a:a + 23], v[layer, a:a + 23])
    pages = store.pages[1]
    assert all(e.cpu >= 0 or e.disk >= 0 for e in pages) and {store.home(e) for e in pages} == {"cpu", "disk"}
    assert [e.gpu >= 0 for e in pages] == [False] * 5 + [True] * 4          # the newest four pages' values
    for layer in range(2):
        for index, e in enumerate(store.pages[layer]):
            rows = slice(index * 16, (index + 1) * 16)
            page = store.read_page(layer, index)                            # from the home: K and V
            assert torch.equal(page[0], k[layer, rows].transpose(0, 1))
            assert torch.equal(page[1], v[layer, rows].transpose(0, 1))
            tier, slot = store.locate(e, VALUES)
            assert tier == ("gpu" if e.gpu >= 0 else store.home(e))
            if tier == "gpu":
                assert torch.equal(store.gpu.page(layer, slot)[0], v[layer, rows].transpose(0, 1))
            assert store.locate(e, KEYS)[0] == store.home(e)
    assert all(run.tier != "gpu" for run in store.runs(1, n))                # readers of K and V go home
    stats = store.stats()
    assert stats["gpu_value_tokens"] == 4 * 16 + 5 and stats["gpu_tokens"] == 5
    assert stats["cpu_tokens"] + stats["disk_tokens"] == 9 * 16
    for cut in (16 * 8 + 3, 16 * 2 + 9):                                     # a cached page, then a disk one
        store.truncate(cut)
        assert torch.equal(store.open_page(0)[0, :, :cut % 16], k[0, cut // 16 * 16:cut].transpose(0, 1))
        assert store.gpu.used_per_layer[0] == sum(e.gpu >= 0 for e in store.pages[0])
        store.write(0, cut, k[0, cut:cut + 40], v[0, cut:cut + 40])
        e = store.pages[0][cut // 16]
        assert e.gpu >= 0 and torch.equal(store.gpu.page(0, e.gpu)[0],
                                          v[0, cut // 16 * 16:cut // 16 * 16 + 16].transpose(0, 1))
