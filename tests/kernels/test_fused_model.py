"""The model's fused small ops (add_rms_norm, silu_mul, rms_norm: what a GPU runs in a graphed decode step and
in long prefills) against its torch path: a prefill and decode steps give the same logits either way."""

from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRET, TOL

from localkv.models import llama
from localkv.models.args import ModelArgs
from localkv.models.loader import build_model
from localkv.offload import make_cache

# bf16 on a GPU only: the interpreter rounds fp32 to bf16 by truncation (Triton 3.9) where torch rounds to
# nearest, a bias that grows through the layers. Its fp16 rounding is numpy's, to nearest.
MODEL_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def _random_model(dtype: torch.dtype):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=100, max_seq_len=64)
    with torch.device("meta"):
        shapes = llama.Transformer(args).state_dict()
    state = {name: (torch.randn(t.shape) * 0.2 if t.dim() == 2 else 1 + 0.1 * torch.randn(t.shape))
             for name, t in shapes.items()}
    return build_model(args, state.items(), DEVICE, dtype, Path("random")), args


def _logits(model, args, ids, prompt: int) -> torch.Tensor:
    """Last-position logits of a prefill of ``prompt`` tokens, then of each decode step after it."""
    cache = make_cache("exact", args, 64)
    with torch.inference_mode():
        rows = [model(ids[:prompt], cache)]
        rows += [model(ids[t:t + 1], cache, decode=True) for t in range(prompt, len(ids))]
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
def test_fused_path_gives_the_torch_paths_logits(dtype, monkeypatch, kernel_ran):
    model, args = _random_model(dtype)
    ids = torch.randint(0, args.vocab_size, (24,), device=DEVICE)
    want = _logits(model, args, ids, prompt=20)
    monkeypatch.setattr(llama, "_fused", lambda x: True)   # as on a GPU under graph capture
    got = _logits(model, args, ids, prompt=20)
    for op in ("rms_norm", "add_rms_norm", "silu_mul"):
        kernel_ran(op)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol)
