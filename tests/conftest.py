"""Shared fixtures: the embedded SmolLM2 GGUF, transformers' copy of it, and a writer of tiny GGUF files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model, pulled once into the normal cache (``$LOCALKV_HOME`` or ~/.cache/localkv)."""
    from localkv.models.hub import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' ``(model, tokenizer)`` loaded from the same GGUF (fp32, eval); about 30 s, once a session."""
    transformers = pytest.importorskip("transformers")
    kw = dict(gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), **kw)
    return model.float().eval(), tokenizer


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face rotate-half rows -> interleaved RoPE pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: Path, arch: str = "llama", *, layers: int = 2, dim: int = 64, heads: int = 4, kv_heads: int = 2,
               ffn: int = 96, vocab: int = 64, qtype=None, tie: bool = True, seed: int | None = None,
               metadata: dict | None = None, extra_tensors: dict | None = None) -> dict[str, np.ndarray]:
    """Write a random Llama-family GGUF as llama.cpp's converter would; return its weights in our names (HF layout).

    Weights are fp16-representable, so F32/F16 files reproduce them exactly. ``qtype`` (a GGMLQuantizationType)
    quantizes the 2-D weights; ``metadata`` adds ``{key: value}`` (str, float, int, bool or list);
    ``extra_tensors`` adds raw tensors ``{gguf_name: (array, raw_dtype or None)}``.
    """
    import gguf

    rng = np.random.default_rng(seed)
    hd = dim // heads

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float16).astype(np.float32)

    ours = {"embed_tokens.weight": rand(vocab, dim), "norm.weight": 1 + rand(dim)}
    if not tie:
        ours["lm_head.weight"] = rand(vocab, dim)
    for i in range(layers):
        p = f"layers.{i}."
        ours |= {p + "self_attn.q_proj.weight": rand(heads * hd, dim), p + "self_attn.k_proj.weight": rand(kv_heads * hd, dim),
                 p + "self_attn.v_proj.weight": rand(kv_heads * hd, dim), p + "self_attn.o_proj.weight": rand(dim, heads * hd),
                 p + "mlp.gate_proj.weight": rand(ffn, dim), p + "mlp.up_proj.weight": rand(ffn, dim),
                 p + "mlp.down_proj.weight": rand(dim, ffn), p + "input_layernorm.weight": 1 + rand(dim),
                 p + "post_attention_layernorm.weight": 1 + rand(dim)}
        if arch == "qwen2":
            ours |= {p + "self_attn.q_proj.bias": rand(heads * hd), p + "self_attn.k_proj.bias": rand(kv_heads * hd),
                     p + "self_attn.v_proj.bias": rand(kv_heads * hd)}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_array(key, value)
    for name, value in ours.items():
        parts = name.split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{_GGUF_NAMES[parts[3] if parts[2] in ('self_attn', 'mlp') else parts[2]]}.{parts[-1]}"
        else:
            gname = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[parts[0]] + "." + parts[-1]
        if arch == "llama" and ".attn_q." in gname:
            value = permute_qk(value, heads)
        elif arch == "llama" and ".attn_k." in gname:
            value = permute_qk(value, kv_heads)
        if qtype is not None and value.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, value)
    for gname, (value, raw_dtype) in (extra_tensors or {}).items():
        w.add_tensor(gname, value, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ours


@pytest.fixture
def make_gguf(tmp_path):
    """``make_gguf(name="tiny.gguf", **write_gguf_kwargs) -> (path, weights)``: a tiny GGUF under tmp_path."""
    def make(name: str = "tiny.gguf", **kwargs):
        path = tmp_path / name
        return path, write_gguf(path, **kwargs)
    return make
