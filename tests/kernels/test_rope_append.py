"""rope_append: one launch rotating a decode step's queries and keys and writing K/V into place, against its
torch reference (fp32 rotation, as the kernel's); every row outside the tokens' must stay as it was."""

import pytest
import torch
from kernel_testing import DEVICE, assert_close, poisoned

from localkv.kernels import rope_append, rope_append_ref, rope_ref


def _tables(T, D, dtype):
    ang = torch.rand(T, D // 2, device=DEVICE) * 100
    return torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("T,Hkv,G,D", [(1, 2, 4, 64), (1, 3, 1, 128), (3, 1, 8, 64), (2, 2, 3, 80)])
@pytest.mark.parametrize("n_dst,raw", [(1, False), (2, True)])
def test_rope_append_matches_reference(T, Hkv, G, D, dtype, kv_dtype, n_dst, raw, kernel_ran):
    Hq = Hkv * G
    fused = torch.randn(T, (Hq + 2 * Hkv + 1) * D, dtype=dtype, device=DEVICE)   # q, k, v columns of one product
    q = fused[:, :Hq * D].view(T, Hq, D)
    k = fused[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = fused[:, (Hq + Hkv) * D:(Hq + 2 * Hkv) * D].view(T, Hkv, D)
    cos, sin = _tables(T, D, dtype)
    sizes = [int(torch.randint(T, 40, ())) for _ in range(n_dst)]
    bufs = [(torch.randn(Hkv, N, D, device=DEVICE).to(kv_dtype), torch.randn(Hkv, N, D, device=DEVICE).to(kv_dtype))
            for N in sizes]
    rows = [torch.randint(0, N - T + 1, (1,), device=DEVICE) for N in sizes]
    dsts = [(kb.clone(), vb.clone(), r) for (kb, vb), r in zip(bufs, rows)]
    want = [(kb.clone(), vb.clone(), r) for (kb, vb), r in zip(bufs, rows)]
    park = park_want = None
    if raw:
        base = torch.randn(24, Hkv * D, device=DEVICE)
        row = torch.randint(0, 24 - T + 1, (1,), device=DEVICE)
        park, park_want = (base.clone(), row), (base.clone(), row)
    out = rope_append(q, k, v, cos, sin, dsts, park)
    kernel_ran("rope_append")
    q_want = rope_append_ref(q.float(), k.float(), v, cos.float(), sin.float(), want, park_want)
    assert out.shape == (T, Hq, D) and out.dtype == dtype
    assert_close(out, q_want, dtype, "queries")
    for (kb, vb, _), (kw, vw, _) in zip(dsts, want):
        assert_close(kb, kw, kv_dtype, "keys")                 # the other rows: bit-equal to the untouched copy
        torch.testing.assert_close(vb, vw, rtol=0, atol=0)     # values are copied, not computed
    if raw:
        torch.testing.assert_close(park[0], park_want[0], rtol=0, atol=0)


def test_rope_append_writes_every_row_of_its_tokens(kernel_ran):
    """Poisoned destinations: the tokens' rows come out finite and equal to the reference; the rest stay NaN."""
    T, Hkv, G, D = 2, 2, 4, 64
    q, k, v = (torch.randn(T, h, D, device=DEVICE) for h in (Hkv * G, Hkv, Hkv))
    cos, sin = _tables(T, D, torch.float32)
    kb, vb = poisoned((Hkv, 10, D), torch.float32), poisoned((Hkv, 10, D), torch.float32)
    row = torch.tensor([5], device=DEVICE)
    out = rope_append(q, k, v, cos, sin, [(kb, vb, row)])
    kernel_ran("rope_append")
    assert_close(kb[:, 5:7], rope_ref(k, cos, sin).transpose(0, 1), torch.float32, "keys")
    assert_close(vb[:, 5:7], v.transpose(0, 1), torch.float32, "values")
    assert torch.isnan(kb[:, :5]).all() and torch.isnan(kb[:, 7:]).all() and torch.isnan(vb[:, 7:]).all()
    assert_close(out, rope_ref(q, cos, sin), torch.float32, "queries")


def test_rope_append_rejects_bad_shapes():
    q, k = torch.randn(1, 8, 64), torch.randn(1, 3, 64)
    cos = sin = torch.ones(1, 64)
    buf = torch.zeros(3, 4, 64)
    with pytest.raises(ValueError, match="multiple"):
        rope_append(q, k, k, cos, sin, [(buf, buf, torch.zeros(1, dtype=torch.long))])
    k = torch.randn(1, 2, 64)
    with pytest.raises(ValueError, match="destination"):
        rope_append(q, k, k, cos, sin, [(buf, buf, torch.zeros(1, dtype=torch.long))])
