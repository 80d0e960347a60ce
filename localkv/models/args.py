"""`ModelArgs`: the shape of a Llama-family model, from a Hugging Face ``config.json`` or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFormatError

# model_type values (config.json) and GGUF general.architecture values this module can run.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    """Dimensions and options of one Llama-family model (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM2)."""

    arch: str = "llama"
    """Family name: ``llama``, ``mistral`` or ``qwen2``."""
    dim: int = 4096
    """Width of the residual stream (``hidden_size``)."""
    n_layers: int = 32
    n_heads: int = 32
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (GQA); defaults to ``n_heads``."""
    head_dim: int | None = None
    """Per-head width; defaults to ``dim // n_heads``."""
    ffn_dim: int = 11008
    """Hidden width of the SwiGLU MLP (``intermediate_size``)."""
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling as in config.json: ``{"rope_type": "llama3" | "linear" | "dynamic" | "yarn", ...}``."""
    max_seq_len: int = 4096
    """Trained context (``max_position_embeddings``)."""
    tie_embeddings: bool = False
    """Output projection shares the token embedding matrix."""
    qkv_bias: bool = False
    """Biases on the q, k, v projections (Qwen2)."""
    o_bias: bool = False
    """Bias on the output projection (Llama configs with ``attention_bias``)."""
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    """Every token id that ends generation (config.json and generation_config.json may list several)."""
    torch_dtype: str | None = None
    """The dtype the weights were published in, if known."""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                f"{self.n_heads} query heads cannot share {self.n_kv_heads} key/value heads evenly")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            self.rope_scaling["rope_type"] = kind
            if kind == "default":
                self.rope_scaling = None

    @property
    def gqa_group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes over all layers at 2 bytes per element (bf16/fp16)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2

    def n_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from a dict whose keys are this class's field names; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None
                       ) -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` dict (and optionally ``generation_config.json``)."""
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"model_type {model_type!r} is not supported (localkv runs: {', '.join(SUPPORTED_ARCHITECTURES)})")
        # transformers 5 writes rope parameters under "rope_parameters"; 4.x under rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos: list[int] = []
        for source in (config, generation_config or {}):
            ids = source.get("eos_token_id")
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and i not in eos:
                    eos.append(int(i))
        qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        return cls(
            arch=model_type,
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            ffn_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=model_type != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        )
