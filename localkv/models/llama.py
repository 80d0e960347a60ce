"""The Llama family in plain torch: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (qkv bias), SmolLM2.

One sequence at a time; activations are (T, dim). Parameter names follow Hugging Face's (less the leading
``model.``) so a safetensors checkpoint loads without renaming. Attention hands pre-RoPE q, k and v to the
per-layer KV object it is given (see ``localkv.offload.kv``) and gets the attention output back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .rope import Rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the weights' dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x, rp, layer_kv, decode: bool):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        attend = layer_kv.decode if decode else layer_kv.prefill
        out = attend(q, k, v, rp)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rp, layer_kv, decode: bool):
        x = x + self.self_attn(self.input_layernorm(x), rp, layer_kv, decode)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A Llama-family decoder. ``forward`` runs new tokens of one sequence on top of the KV it is given."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = Rope(args, self.embed_tokens.weight.device)

    def to_device(self, device: torch.device | str) -> "Transformer":
        self.to(device)
        self.rope = Rope(self.args, device)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(self, tokens: torch.Tensor, cache, *, decode: bool = False, all_logits: bool = False
                ) -> torch.Tensor:
        """Run ``tokens`` (T,) after the ``cache.length`` tokens already in ``cache``.

        Args:
            tokens: (T,) int64 token ids.
            cache: a ``localkv.offload.KVCache``; the tokens are committed to it on success.
            decode: route attention to the policy's decode path (1..γ tokens) instead of prefill.
            all_logits: return logits for every position (T, vocab) instead of the last one (1, vocab).

        Returns:
            fp32 logits, (T, vocab) or (1, vocab).
        """
        T = tokens.shape[0]
        start = cache.reserve(T)
        pos = torch.arange(start, start + T, device=self.device)
        rp = self.rope.positions(pos, self.dtype, start)
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, rp, cache.layer(i), decode)
        cache.commit(T)
        if not all_logits:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()
