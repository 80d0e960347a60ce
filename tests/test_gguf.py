"""GGUF loading: weights against transformers' GGUF loader, the Q/K un-permutation, metadata, and broken files."""

from __future__ import annotations

import os
import random

import gguf
import numpy as np
import pytest
import torch

from localkv.errors import ModelFormatError
from localkv.models.gguf import hf_name, load_gguf, unpermute_qk
from localkv.models.rope import _default_inv_freq, _llama3_inv_freq

from gguf_files import permute_qk

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_gguf):
    return load_gguf(smollm2_gguf)


def test_smollm2_weights_equal_transformers(smollm2_loaded, hf_smollm2):
    args, state, md = smollm2_loaded
    model, _ = hf_smollm2
    ref = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    assert args.tie_embeddings and "lm_head.weight" not in state
    ref.pop("lm_head.weight")
    assert set(state) == set(ref)
    for name in ref:
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], ref[name], rtol=0, atol=0, msg=name)


def test_smollm2_args_match_transformers_config(smollm2_loaded, hf_smollm2):
    args, _, md = smollm2_loaded
    c = hf_smollm2[0].config
    assert (args.arch, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.ffn_dim) == (
        c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.head_dim, c.intermediate_size)
    assert (args.vocab_size, args.max_seq_len, args.tie_embeddings) == (
        c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings)
    assert args.norm_eps == pytest.approx(c.rms_norm_eps) and args.rope_theta == 100000.0
    assert args.rope_scaling is None and not args.qkv_bias
    assert (args.bos_token_id, args.eos_token_id) == (1, [2])
    assert md["tokenizer.ggml.model"] == "gpt2" and len(md["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in md["tokenizer.chat_template"] and not any(k.startswith("GGUF.") for k in md)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_roundtrip_and_transformers(make_gguf, arch):
    """Random HF-layout weights written as llama.cpp would (Q/K permuted for llama) come back unchanged."""
    heads, kv = random.choice([(4, 2), (4, 4), (8, 2), (6, 3)])
    path, ours = make_gguf(arch=arch, heads=heads, kv_heads=kv, dim=16 * heads, tie=random.random() < 0.5)
    args, state, md = load_gguf(path)
    assert (args.arch, args.n_heads, args.n_kv_heads, args.qkv_bias) == (arch, heads, kv, arch == "qwen2")
    assert set(state) == set(ours)
    for name, w in ours.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    for name, w in model.state_dict().items():
        name = name.removeprefix("model.")
        if name in state:
            assert torch.equal(state[name], w.float()), name


@pytest.mark.parametrize("qtype,dtype,atol", [(Q.F16, torch.float32, 0), (Q.BF16, torch.bfloat16, 1e-2),
                                              (Q.Q8_0, torch.float32, 0.02), (Q.Q4_0, torch.float16, 0.12)])
def test_tensor_types_and_dtype(make_gguf, qtype, dtype, atol):
    path, ours = make_gguf(qtype=qtype, dim=64, ffn=128)
    _, state, _ = load_gguf(path, dtype=dtype)
    for name, w in ours.items():
        assert state[name].dtype == dtype and state[name].shape == w.shape
        torch.testing.assert_close(state[name].float(), torch.from_numpy(w), rtol=0, atol=atol, msg=name)


def test_unpermute_inverts_llama_cpp_permute():
    heads, d, cols = random.randint(1, 6), 2 * random.randint(1, 8), random.randint(1, 9)
    w = np.random.default_rng().standard_normal((heads * d, cols)).astype(np.float32)
    assert torch.equal(unpermute_qk(torch.from_numpy(permute_qk(w, heads)), heads), torch.from_numpy(w))
    b = np.random.default_rng().standard_normal(heads * d).astype(np.float32)
    assert torch.equal(unpermute_qk(torch.from_numpy(permute_qk(b, heads)), heads), torch.from_numpy(b))


def test_names():
    assert hf_name("blk.12.attn_q.weight") == "layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.3.ffn_norm.weight") == "layers.3.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight" and hf_name("token_embd.weight") == "embed_tokens.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None and hf_name("mm.0.weight") is None


def test_rope_scaling_metadata(make_gguf):
    factor = random.choice([2.0, 4.0, 8.0])
    path, _ = make_gguf(metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": factor,
                                  "llama.rope.scaling.original_context_length": 64})
    args, _, _ = load_gguf(path)
    assert args.rope_scaling == {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 64}
    path, _ = make_gguf("lin.gguf", metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": factor})
    assert load_gguf(path)[0].rope_scaling == {"rope_type": "linear", "factor": factor}


@pytest.mark.parametrize("low,high,orig", [(1.0, 4.0, 8192), (1.0, 4.0, 64), (2.0, 8.0, 256)])
def test_llama3_rope_freqs_tensor(make_gguf, low, high, orig):
    """Llama 3.1+ GGUFs store llama3 RoPE scaling as per-frequency divisors; we rebuild the same frequencies."""
    factor, head_dim, theta = random.choice([8.0, 16.0, 32.0]), 64, 500000.0
    inv = _default_inv_freq(theta, head_dim)
    want = _llama3_inv_freq(inv, {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                                  "original_max_position_embeddings": orig})
    divisors = (inv / want).numpy().astype(np.float32)
    path, _ = make_gguf(heads=2, dim=2 * head_dim, metadata={"llama.rope.freq_base": theta},
                        extra_tensors={"rope_freqs.weight": (divisors, None)})
    args, state, _ = load_gguf(path)
    assert args.rope_scaling["rope_type"] == "llama3" and "rope_freqs.weight" not in state
    torch.testing.assert_close(_llama3_inv_freq(inv, args.rope_scaling), want, rtol=2e-3, atol=0)


# -- broken files ---------------------------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(ModelFormatError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_and_not_gguf(tmp_path):
    assert "no such" in _error(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(random.randint(0, 4096)))
    assert "not a GGUF" in _error(junk)


def test_truncated(make_gguf):
    path, _ = make_gguf(seed=None)
    data = path.read_bytes()
    for cut in sorted(random.sample(range(4, len(data)), 6)) + [len(data) - 1]:
        path.write_bytes(data[:cut])
        assert "truncated" in _error(path)


def test_unsupported_architecture(make_gguf):
    arch = random.choice(["phi3", "gemma2", "falcon", "gpt2"])
    path, _ = make_gguf(arch=arch)
    msg = _error(path)
    assert arch in msg and "not supported" in msg


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K])
def test_undequantizable_tensor_type(make_gguf, qtype):
    name = random.choice(["blk.0.ffn_up.weight", "blk.1.attn_q.weight", "token_embd.weight"])
    path, _ = make_gguf(dim=256, ffn=256, qtype={name: qtype})
    msg = _error(path)
    assert name in msg and qtype.name in msg and "dequantize" in msg


def test_integer_tensor_and_foreign_tensor(make_gguf):
    path, _ = make_gguf(extra_tensors={"blk.0.attn_q.weight_scale": (np.ones(4, np.float32), None)})
    assert "blk.0.attn_q.weight_scale" in _error(path)
    path, _ = make_gguf("int.gguf", extra_tensors={"rope_freqs.weight": (np.ones(8, np.int32), None)})
    assert "I32" in _error(path)


def test_missing_tensor(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "empty.gguf"), "llama")
    for k, v in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 8, "attention.head_count": 2}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "missing tensor" in _error(tmp_path / "empty.gguf")

