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
from .rope import Rope, fused_small_ops


def input_major(w: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix stored input-major, (in, out), returned as its (out, in) view, which ``F.linear``
    takes as it is. A no-op on a matrix already stored so."""
    return w.t().contiguous().t()


def pack(weights: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (out_i, in) matrices into one (N, in) matrix that ``F.linear`` takes as it is, stored
    input-major (`input_major`): one-row products (decode) read it faster that way.

    - CPU (MKL's gemv, the 2-core dev machine), for matrices with more outputs than inputs: 19.5 against
      11.8 GB/s for 30 layers of 3072x576; the lm_head 23 against 10 GB/s.
    - H100 (cuBLAS, one token, graphed, weights rotating through copies larger than L2, both layouts in one
      run): Llama-3.1-8B's o 14.9 against 16.5 µs, gate|up 83.1 against 85.1, lm_head 359 against 380; qkv and
      down within 3%. So on a GPU the o and down projections are stored so too (`Attention.fuse`, `MLP.fuse`).

    Slices of the result are views, so the separate projections keep their names without a second copy.
    """
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    return input_major(w)


def _fused(x: torch.Tensor) -> bool:
    """Whether the small ops on activations ``x`` (norms, residual adds, SwiGLU's gating) run as Triton kernels:
    on a GPU, where `fused_small_ops` says so. Tests flip it to take the fused path on the CPU."""
    return x.is_cuda and fused_small_ops(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):  # one kernel instead of six launches
            from ..kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 whatever the weights' dtype, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_norm(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + h, the norm of it)``: the residual add before the norm, in the norm's kernel where small ops
        are fused. ``h`` None (nothing to add yet): ``(x, the norm of x)``."""
        if h is None:
            return x, self(x)
        if _fused(x):
            from ..kernels.rms_norm import add_rms_norm

            return add_rms_norm(x, h, self.weight, self.eps)
        x = x + h
        return x, self(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse()
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One (q|k|v) matrix, read in one pass per token; the three projections become views into it."""
        self.qkv_weight = pack([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.qkv_bias = (torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
                         if self.q_proj.bias is not None else None)
        if self.o_proj.weight.is_cuda:   # (not measured on a CPU, where it stays as it is)
            self.o_proj.weight = nn.Parameter(input_major(self.o_proj.weight), requires_grad=False)
        nq, nk = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
        for proj, (a, b) in ((self.q_proj, (0, nq)), (self.k_proj, (nq, nq + nk)), (self.v_proj, (nq + nk, None))):
            proj.weight = nn.Parameter(self.qkv_weight[a:b], requires_grad=False)
            if proj.bias is not None:
                proj.bias = nn.Parameter(self.qkv_bias[a:b], requires_grad=False)

    def _apply(self, fn, recurse=True):
        # .to() / .half() move each projection on its own: fuse again so the views point into one matrix.
        super()._apply(fn, recurse)
        if self.qkv_weight is not None:
            self.fuse()
        return self

    def forward(self, x, rp, layer_kv, decode: bool):
        T = x.shape[0]
        if self.qkv_weight is not None:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q = qkv[:, :nq].view(T, self.n_heads, self.head_dim)
            k = qkv[:, nq:nq + nk].view(T, self.n_kv_heads, self.head_dim)
            v = qkv[:, nq + nk:].view(T, self.n_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(T, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)
            v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        attend = layer_kv.decode if decode else layer_kv.prefill
        out = attend(q, k, v, rp)  # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.n_heads * self.head_dim))


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the (T, 2F) product of the fused (gate|up) matrix."""
    if _fused(gate_up):  # one kernel instead of two
        from ..kernels.silu_mul import silu_mul

        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()

    def fuse(self) -> None:
        """One (gate|up) matrix; the two projections become views into it."""
        if self.gate_proj.bias is not None:
            return
        n = self.gate_proj.weight.shape[0]
        self.gate_up_weight = pack([self.gate_proj.weight, self.up_proj.weight])
        if self.down_proj.weight.is_cuda:  # on a CPU the down projection reads faster as it is
            self.down_proj.weight = nn.Parameter(input_major(self.down_proj.weight), requires_grad=False)
        self.gate_proj.weight = nn.Parameter(self.gate_up_weight[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.gate_up_weight[n:], requires_grad=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.gate_up_weight is not None:
            self.fuse()
        return self

    def forward(self, x):
        if self.gate_up_weight is not None:
            return self.down_proj(_silu_mul(F.linear(x, self.gate_up_weight)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, h, rp, layer_kv, decode: bool):
        """The residual stream is ``x + h``, the add left to the block's first norm (``h`` None: just ``x``).
        Returns ``(x, h)`` the same way: the sum before the MLP, and the MLP's output for the next norm to add."""
        x, n = self.input_layernorm.add_norm(x, h)
        x, n = self.post_attention_layernorm.add_norm(x, self.self_attn(n, rp, layer_kv, decode))
        return x, self.mlp(n)


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

    def fuse(self) -> "Transformer":
        """Fuse q/k/v and gate/up into single matrices (fewer, larger products per token; same numbers), stored
        input-major where one-token products read faster so (`pack`). The separate projections stay, as views,
        so ``state_dict`` keeps its names and no memory is added."""
        for block in self.layers:
            block.self_attn.fuse()
            block.mlp.fuse()
        self._pack_lm_head()
        return self

    def _pack_lm_head(self) -> None:
        weight = nn.Parameter(pack([self.lm_head.weight]), requires_grad=False)
        self.lm_head.weight = weight
        if self.args.tie_embeddings:
            self.embed_tokens.weight = weight  # embedding rows read from the transposed view just as well

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.lm_head.weight.device.type != "meta":
            self._pack_lm_head()
        return self

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
        logits = self.step(tokens, pos, cache, decode=decode, all_logits=all_logits, start=start)
        cache.commit(T)
        return logits

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache, *, decode: bool, all_logits: bool = False,
             start: int | None = None) -> torch.Tensor:
        """The forward proper, positions given as a device tensor and the cache's length left alone.

        With ``start=None`` nothing is read back to the host, so a CUDA graph can hold the whole step and
        replay it with new ``tokens`` and ``pos`` (``localkv.runtime.graphs``); ``cache`` is then a view whose
        layers take their write position from the same tensor.
        """
        rp = self.rope.positions(pos, self.dtype, start, static=start is None)
        x, h = self.embed_tokens(tokens), None   # the residual stream is x + h (see Block.forward)
        for i, block in enumerate(self.layers):
            x, h = block(x, h, rp, cache.layer(i), decode)
        if not all_logits:
            x, h = x[-1:], h[-1:]
        return self.lm_head(self.norm.add_norm(x, h)[1]).float()
