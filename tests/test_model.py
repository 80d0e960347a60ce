"""The Llama-family model against Hugging Face transformers on tiny random weights."""

from pathlib import Path

import pytest
import torch

from localkv.models.args import ModelArgs
from localkv.models.loader import build_model, load_model
from localkv.offload import make_cache

transformers = pytest.importorskip("transformers")

ROPE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "dynamic", "factor": 2.0},
]


def _hf_and_ours(model_type, rope_scaling=None, max_pos=64, **extra):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=100, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=model_type == "qwen2", **extra)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    d = config.to_dict()
    d["model_type"] = model_type
    args = ModelArgs.from_hf_config(d)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours = build_model(args, state.items(), torch.device("cpu"), torch.float32, Path("test"))
    return hf, ours, args


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("rope_scaling", ROPE_SCALINGS, ids=lambda s: s["rope_type"] if s else "default")
def test_logits_match_transformers(model_type, rope_scaling):
    # Dynamic NTK rescales by the sequence length seen, so it is compared over one forward pass past the
    # trained length; the others are also fed in pieces (prefill chunks, then single decode steps).
    max_pos = 16 if rope_scaling and rope_scaling["rope_type"] == "dynamic" else 64
    hf, ours, args = _hf_and_ours(model_type, rope_scaling, max_pos)
    T = 40
    ids = torch.randint(0, 100, (T,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        cache = make_cache("exact", args, 128)
        if rope_scaling and rope_scaling["rope_type"] == "dynamic":
            got = ours(ids, cache, all_logits=True)
        else:
            parts = [ours(ids[:25], cache, all_logits=True), ours(ids[25:36], cache, all_logits=True)]
            parts += [ours(ids[t:t + 1], cache, decode=True, all_logits=True) for t in range(36, T)]
            got = torch.cat(parts)
    assert cache.length == T
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_attention_bias_llama():
    hf, ours, args = _hf_and_ours("llama", attention_bias=True)
    assert args.qkv_bias and args.o_bias
    ids = torch.randint(0, 100, (17,))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, make_cache("exact", args, 64), all_logits=True),
                                   hf(ids[None]).logits[0], rtol=1e-4, atol=1e-4)


def test_sharded_qwen2_directory_matches_transformers(tmp_path):
    """A tiny Qwen2-style model (qkv bias, GQA, tied embeddings) in sharded safetensors, loaded end to end."""
    from tiny import write_model

    path = write_model(tmp_path / "qwen", "qwen2", kv_heads=1, heads=4)
    assert (path / "model.safetensors.index.json").is_file()
    loaded = load_model(path, device="cpu", dtype="fp32")
    assert loaded.args.qkv_bias and loaded.args.tie_embeddings and loaded.args.gqa_group == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.args.vocab_size, (33,))
    with torch.no_grad():
        got = loaded.model(ids, make_cache("exact", loaded.args, 64), all_logits=True)
        torch.testing.assert_close(got, hf(ids[None]).logits[0], rtol=1e-4, atol=1e-4)


def test_fused_weights_follow_the_model_across_moves():
    hf, ours, args = _hf_and_ours("qwen2")
    ids = torch.randint(0, 100, (9,))
    ours = ours.to(torch.float64)  # moves/casts every projection: the fused matrices must follow
    ours.rope = type(ours.rope)(args)
    attn = ours.layers[0].self_attn
    assert attn.qkv_weight.dtype == torch.float64
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # still views, no second copy
    with torch.no_grad():
        got = ours(ids, make_cache("exact", args, 16), all_logits=True)
        torch.testing.assert_close(got, hf.double()(ids[None]).logits[0].float(), rtol=1e-4, atol=1e-4)
