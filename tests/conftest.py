"""Shared fixtures: the embedded SmolLM2 GGUF, transformers' copy of it, a writer of tiny GGUF files, and the
tiny random llamas the ShadowKV tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from gguf_files import write_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model, pulled once into the normal cache (``$LOCALKV_HOME`` or ~/.cache/localkv)."""
    from localkv.models.hub import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """Our `Tokenizer` built from the embedded GGUF's metadata."""
    from localkv.models.gguf import read_gguf_metadata
    from localkv.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf(read_gguf_metadata(smollm2_gguf))


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """transformers' tokenizer loaded from the embedded GGUF (a few seconds, once a session). Do not mutate it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf, hf_smollm2_tokenizer):
    """transformers' ``(model, tokenizer)`` from the embedded GGUF (dequantized to fp32, eval mode); ~30 s, once."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model.eval(), hf_smollm2_tokenizer


@pytest.fixture
def make_gguf(tmp_path):
    """``make_gguf(name="tiny.gguf", **write_gguf_kwargs) -> (path, weights)``: a tiny GGUF under tmp_path."""
    def make(name: str = "tiny.gguf", **kwargs):
        path = tmp_path / name
        return path, write_gguf(path, **kwargs)
    return make


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer llama (Hq 4, Hkv 2, D 16) with weights wide enough that attention is not uniform."""
    import torch

    from test_model import _hf_and_ours

    _, model, args = _hf_and_ours("llama", max_pos=4096)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        # One throwaway forward. In about one pytest process in eight, the model's first forward (a 150-token
        # prompt, exact cache, torch 2.13 on the CPU) gave logits off by ~5e-3 from about its 77th row, where a
        # second exact cache given the same prompt agreed with every other policy to 1e-5; with a forward
        # before it, none did in 16 runs. Tests compare policies at 1e-4, so they start after one.
        from localkv.offload import make_cache

        model(torch.zeros(150, dtype=torch.long), make_cache("exact", args, 256), all_logits=True)
    return model, args


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """`localkv.load` of a tiny random llama on the CPU (4K context, fp32)."""
    import localkv
    from tiny import write_model

    return localkv.load(write_model(tmp_path_factory.mktemp("skv") / "m", "llama", max_position_embeddings=8192),
                        ctx="4K", device="cpu", dtype="fp32")
