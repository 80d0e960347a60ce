"""lowrank_rope: ShadowKV key rebuild + RoPE against the reference and the model's RoPE."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, poisoned

from localkv.kernels import lowrank_rope, lowrank_rope_ref
from localkv.models.rope import apply_rotary

CHUNK = 8

# (S tokens, rank, Hkv, D, n_sel, with positions, SV given as a transposed (Hkv, D, r) view)
CASES = {
    "normal": (160, 32, 2, 64, 5, True, False),
    "rank160_d128": (96, 160, 2, 128, 4, False, False),
    "one_chunk_mha": (64, 16, 1, 64, 1, True, True),
    "sv_transposed_rank_ragged": (200, 40, 3, 128, 7, True, True),
}


def _tables(P, D, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D))
    freqs = torch.arange(P, device=DEVICE).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)                                        # (P, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inputs(case, dtype):
    S, R, Hkv, D, n_sel, with_pos, transposed = case
    u = torch.randn(S, R, dtype=dtype, device=DEVICE)
    sv = torch.randn(Hkv, D, R, device=DEVICE).transpose(1, 2) if transposed else torch.randn(Hkv, R, D, device=DEVICE)
    sv = (sv / R ** 0.5).to(dtype)
    idx = torch.stack([torch.randperm(S // CHUNK, device=DEVICE)[:n_sel] for _ in range(Hkv)]).to(torch.int32)
    pos = torch.randint(0, 4 * S, (S,), device=DEVICE) if with_pos else None
    cos, sin = _tables(4 * S, D, dtype)
    return u, sv, idx, pos, cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, kernel_ran):
    u, sv, idx, pos, cos, sin = _inputs(CASES[name], dtype)
    Hkv, n_sel = idx.shape
    D = sv.shape[2]
    out = poisoned((Hkv, n_sel * CHUNK + CHUNK, D), dtype)            # one spare slot must stay untouched
    assert lowrank_rope(u, sv, idx, cos, sin, out, pos=pos, chunk_tokens=CHUNK) is out
    kernel_ran("lowrank_rope")
    ref = lowrank_rope_ref(u, sv, idx, cos, sin, torch.empty(Hkv, n_sel * CHUNK, D, dtype=dtype, device=DEVICE),
                           pos=pos, chunk_tokens=CHUNK)
    assert_close(out[:, : n_sel * CHUNK], ref, dtype)
    assert torch.isnan(out[:, n_sel * CHUNK:]).all()


def test_equals_model_rope_of_full_keys(kernel_ran):
    """Same rows as rotating the full low-rank keys with the model's apply_rotary, then gathering."""
    u, sv, idx, pos, cos, sin = _inputs(CASES["normal"], torch.float32)
    Hkv, n_sel = idx.shape
    D = sv.shape[2]
    keys = torch.einsum("sr,hrd->shd", u, sv)                                  # (S, Hkv, D) pre-RoPE
    rotated = apply_rotary(keys, cos[pos], sin[pos])                           # (S, Hkv, D)
    out = lowrank_rope(u, sv, idx, cos, sin, poisoned((Hkv, n_sel * CHUNK, D), torch.float32), pos=pos)
    kernel_ran("lowrank_rope")
    tok = (idx.long()[:, :, None] * CHUNK + torch.arange(CHUNK, device=DEVICE)).reshape(Hkv, -1)
    expected = torch.stack([rotated[tok[h], h] for h in range(Hkv)])          # (Hkv, n_sel*CHUNK, D)
    assert_close(out, expected, torch.float32)


def test_empty_selection_writes_nothing(kernel_ran):
    u, sv, idx, pos, cos, sin = _inputs(CASES["normal"], torch.float32)
    out = poisoned((2, CHUNK, 64), torch.float32)
    lowrank_rope(u, sv, idx[:, :0], cos, sin, out, pos=pos)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dst_writes_chunk_slots(dtype, kernel_ran):
    """With ``dst`` each chunk's keys land in its slot of a larger buffer; slots not named stay untouched."""
    u, sv, idx, pos, cos, sin = _inputs(CASES["sv_transposed_rank_ragged"], dtype)
    Hkv, n_sel = idx.shape
    D, n_slots = sv.shape[2], 2 * n_sel + 1
    dst = torch.stack([torch.randperm(n_slots, device=DEVICE)[:n_sel] for _ in range(Hkv)])
    out = poisoned((Hkv, n_slots * CHUNK, D), dtype)
    assert lowrank_rope(u, sv, idx, cos, sin, out, pos=pos, chunk_tokens=CHUNK, dst=dst) is out
    kernel_ran("lowrank_rope")
    in_order = lowrank_rope_ref(u, sv, idx, cos, sin, torch.empty(Hkv, n_sel * CHUNK, D, dtype=dtype, device=DEVICE),
                                pos=pos, chunk_tokens=CHUNK)
    slots = out.view(Hkv, n_slots, CHUNK, D)
    for h in range(Hkv):
        assert_close(slots[h, dst[h]], in_order[h].view(n_sel, CHUNK, D), dtype)
        rest = torch.ones(n_slots, dtype=torch.bool, device=DEVICE)
        rest[dst[h]] = False
        assert torch.isnan(slots[h, rest]).all()
