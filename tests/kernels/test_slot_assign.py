"""assign_slots: hits keep their slots, misses take the least recently used free ones; against the torch version."""

import pytest
import torch
from kernel_testing import DEVICE

from localkv.kernels import assign_slots, assign_slots_ref

# (Hkv, k, n_slots, n_chunks)
CASES = {
    "decode": (2, 9, 18, 40),
    "slots_equal_k": (3, 7, 7, 25),
    "one_chunk": (1, 1, 2, 5),
    "wide": (1, 70, 150, 300),
}


def _tables(Hkv, n_slots, n_chunks):
    chunk_slot = torch.full((Hkv, n_chunks + 1), -1, dtype=torch.long, device=DEVICE)
    slot_chunk = torch.full((Hkv, n_slots + 1), -1, dtype=torch.long, device=DEVICE)
    slot_age = torch.zeros(Hkv, n_slots + 1, dtype=torch.int32, device=DEVICE)
    step = torch.zeros(Hkv, dtype=torch.int32, device=DEVICE)
    return [chunk_slot, slot_chunk, slot_age, step]


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_over_steps(name, kernel_ran):
    """Twelve steps of fresh selections, biased toward the last ones (so hits and misses mix): the slots, the
    fetch targets, the hit count and every table equal the reference's after each step."""
    Hkv, k, n_slots, n_chunks = CASES[name]
    ours, ref = _tables(Hkv, n_slots, n_chunks), _tables(Hkv, n_slots, n_chunks)
    hits, ref_hits = (torch.zeros((), dtype=torch.long, device=DEVICE) for _ in range(2))
    last = None
    for _ in range(12):
        rows = []
        for h in range(Hkv):
            pool = torch.randperm(n_chunks, device=DEVICE)
            if last is not None and torch.rand(()) < 0.7:   # keep some of last step's chunks
                keep = last[h][torch.randperm(k, device=DEVICE)[:torch.randint(0, k + 1, ()).item()]]
                pool = torch.cat([keep, pool[~torch.isin(pool, keep)]])
            rows.append(pool[:k].sort().values)
        sel = torch.stack(rows)
        slots, dst = assign_slots(sel, *ours, n_slots, hits)
        kernel_ran("assign_slots")
        ref_slots, ref_dst = assign_slots_ref(sel, *ref, n_slots, ref_hits)
        torch.testing.assert_close(slots, ref_slots)
        torch.testing.assert_close(dst, ref_dst)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a[..., :-1] if a.dim() == 2 else a, b[..., :-1] if b.dim() == 2 else b)
        torch.testing.assert_close(hits, ref_hits)
        assert all(len(set(r.tolist())) == k for r in slots)   # distinct slots per head
        last = sel


def test_all_hits_fetch_nothing(kernel_ran):
    Hkv, k, n_slots, n_chunks = 2, 5, 8, 20
    tables = _tables(Hkv, n_slots, n_chunks)
    sel = torch.stack([torch.randperm(n_chunks, device=DEVICE)[:k].sort().values for _ in range(Hkv)])
    first, _ = assign_slots(sel, *tables, n_slots)
    slots, dst = assign_slots(sel, *tables, n_slots)
    kernel_ran("assign_slots")
    torch.testing.assert_close(slots, first)
    assert torch.all(dst == -1)
    assert torch.all(tables[3] == 2)


def test_rejects_too_few_slots():
    tables = _tables(1, 3, 10)
    with pytest.raises(ValueError):
        assign_slots(torch.arange(4, device=DEVICE)[None], *tables, 3)


@pytest.mark.parametrize("spread", [3, 2**30])
def test_misses_take_the_oldest_free_slots(spread, kernel_ran):
    """Ages drawn from a few recent steps, or from the whole int32 range (slots idle for ages, never used): the
    misses take the free slots used longest ago, ties to the lowest slot, in ascending slot order."""
    Hkv, k, n_slots, n_chunks = 3, 12, 40, 90
    chunk_slot, slot_chunk, slot_age, step = _tables(Hkv, n_slots, n_chunks)
    step.fill_(spread + 5)
    slot_age[:, :n_slots] = torch.randint(0, spread + 5, (Hkv, n_slots), dtype=torch.int32, device=DEVICE)
    slot_age[:, :n_slots:7] = 0                                   # never used
    for h in range(Hkv):                                          # a chunk in some slots: the hits to come
        held = torch.randperm(n_chunks, device=DEVICE)[:n_slots // 2]
        slot_chunk[h, :n_slots // 2] = held
        chunk_slot[h, held] = torch.arange(n_slots // 2, device=DEVICE)
    sel = torch.stack([torch.randperm(n_chunks, device=DEVICE)[:k].sort().values for _ in range(Hkv)])
    ages = slot_age.clone()
    slots, dst = assign_slots(sel, chunk_slot, slot_chunk, slot_age, step, n_slots)
    kernel_ran("assign_slots")
    for h in range(Hkv):
        hit_slots = {s for s, d in zip(slots[h].tolist(), dst[h].tolist()) if d < 0}
        free = sorted((int(ages[h, s]), s) for s in range(n_slots) if s not in hit_slots)
        m = int((dst[h] >= 0).sum())
        assert dst[h][dst[h] >= 0].tolist() == sorted(s for _, s in free[:m])
