"""Tiny GGUF files written as llama.cpp's converter writes them, for loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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

    Weights are fp16-representable, so F32/F16 files reproduce them exactly. ``qtype`` (a GGMLQuantizationType,
    or ``{gguf_name: type}``) stores the 2-D weights quantized; ``metadata`` adds ``{key: value}`` (str, float,
    int, bool or list); ``extra_tensors`` adds raw tensors ``{gguf_name: (array, raw_dtype or None)}``.
    """
    import gguf

    rng = np.random.default_rng(seed)
    hd = dim // heads

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float16).astype(np.float32)

    ours = {"embed_tokens.weight": rand(vocab, dim), "norm.weight": 1 + rand(dim)}
    if not tie:
        ours["lm_head.weight"] = rand(vocab, dim)
    shapes = {"self_attn.q_proj": (heads * hd, dim), "self_attn.k_proj": (kv_heads * hd, dim),
              "self_attn.v_proj": (kv_heads * hd, dim), "self_attn.o_proj": (dim, heads * hd),
              "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim), "mlp.down_proj": (dim, ffn)}
    for i in range(layers):
        ours |= {f"layers.{i}.{n}.weight": rand(*shape) for n, shape in shapes.items()}
        ours |= {f"layers.{i}.{n}.weight": 1 + rand(dim) for n in ("input_layernorm", "post_attention_layernorm")}
        if arch == "qwen2":
            ours |= {f"layers.{i}.self_attn.{n}_proj.bias": rand(shapes[f"self_attn.{n}_proj"][0]) for n in "qkv"}

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
            gname = f"blk.{parts[1]}.{_GGUF_NAMES[parts[-2]]}.{parts[-1]}"
        else:
            gname = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[parts[0]] + ".weight"
        if arch == "llama" and ".attn_q." in gname:
            value = permute_qk(value, heads)
        elif arch == "llama" and ".attn_k." in gname:
            value = permute_qk(value, kv_heads)
        kind = qtype.get(gname) if isinstance(qtype, dict) else qtype
        if kind is not None and value.ndim == 2:
            try:
                w.add_tensor(gname, gguf.quants.quantize(value, kind), raw_dtype=kind)
            except NotImplementedError:  # a type gguf cannot (de)quantize: write random blocks of the right size
                block, size = gguf.GGML_QUANT_SIZES[kind]
                raw = rng.integers(0, 256, (value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
                w.add_tensor(gname, raw, raw_dtype=kind)
        else:
            w.add_tensor(gname, value)
    for gname, (value, raw_dtype) in (extra_tensors or {}).items():
        w.add_tensor(gname, value, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ours
