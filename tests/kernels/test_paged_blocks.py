"""The store's page blocks read in place by the sparse-attention kernel (offload.attention.block_attention_lse)."""

import pytest
import torch

from localkv.kernels._common import KERNEL_CALLS
from localkv.offload.attention import attention_lse, block_attention_lse


@pytest.mark.parametrize("n,Hkv,G,P,D,T", [(1, 2, 4, 16, 64, 1), (3, 1, 8, 32, 64, 2), (5, 4, 1, 16, 128, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_in_place_matches_reference(n, Hkv, G, P, D, T, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs it on a CPU
    block = torch.randn(n, 2, Hkv, P, D, device=device).to(dtype)
    q = torch.randn(T, G * Hkv, D, device=device).to(dtype)
    calls = KERNEL_CALLS["sparse_attention"]
    out, lse = block_attention_lse(q, block, use_kernel=True)
    assert KERNEL_CALLS["sparse_attention"] == calls + 1
    keys = block[:, 0].transpose(0, 1).reshape(Hkv, n * P, D).float().cpu()
    values = block[:, 1].transpose(0, 1).reshape(Hkv, n * P, D).float().cpu()
    ref_out, ref_lse = attention_lse(q.float().cpu(), keys, values, causal=False)
    out, lse = out.cpu(), lse.cpu()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
