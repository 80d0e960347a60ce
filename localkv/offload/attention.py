"""Exact attention over keys and values already laid out per KV head, with grouped-query sharing.

Keys and values are (Hkv, S, D): position j of the sequence at row j. Queries are (T, Hq, D) for the
positions ``q_start .. q_start+T-1``; query head h reads KV head ``h // G`` with ``G = Hq / Hkv``. For
decode the G query heads of a group are folded into the query-length axis, (Hkv, G*T, D), so the KV is
read once per group and never repeated in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
    """Causal attention of q (T, Hq, D) at positions ``q_start..`` over k, v (Hkv, S, D), S = q_start + T.

    Returns (T, Hq, D).
    """
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    if T > 1 and q_start == 0:
        # Plain causal prefill: (1, Hq, T, D) lets SDPA pick its flash path.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], is_causal=True, enable_gqa=G > 1)
        return out[0].transpose(0, 1)
    if T > 1 and q.is_cuda:
        attn = ChunkAttention(q)  # the prefix (all visible) and the chunk (causal), fused kernels, merged
        attn.add(k, v, causal=True)
        return attn.result()
    if T > 1 or q.device.type == "cpu":
        # A chunk after a prefix: the prefix (all visible) and the chunk (causal) as two fused attentions
        # merged by their log-sum-exp, several times faster than one attention with a (T, S) mask.
        # On a CPU the same function's small-query path is also the fastest decode.
        out, _ = attention_lse(q, k, v, causal=True)
        return out.to(q.dtype)
    # GPU decode: (T, Hq, D) -> (Hkv, G*T, D), the G query heads of a group share one read of their KV.
    qg = q.transpose(0, 1).reshape(Hkv, G * T, D)
    out = F.scaled_dot_product_attention(qg, k, v)  # (Hkv, G*T, D)
    return out.reshape(Hq, T, D).transpose(0, 1)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (T, Hq, D) over k, v (Hkv, S, D) with its log-sum-exp, for merging partial results.

    ``causal`` aligns the queries with the last T keys (query t sees keys 0 .. S - T + t); otherwise every
    key is visible. Returns out (T, Hq, D) fp32 and lse (T, Hq) fp32 (natural log of the sum of
    exp(q.k / sqrt(D)) over the visible keys).
    """
    T, Hq, D = q.shape
    Hkv, S, _ = k.shape
    G = Hq // Hkv
    scale = D ** -0.5
    if G * T <= 64 or q.device.type not in ("cuda", "cpu"):
        # Few query rows (decode): grouped fp32 matmuls, the KV read once per group.
        qg = q.transpose(0, 1).reshape(Hkv, G * T, D).float()
        s = torch.matmul(qg, k.float().transpose(1, 2)) * scale  # (Hkv, G*T, S)
        if causal and T > 1:
            rows = torch.arange(T, device=q.device).repeat(G)[:, None] + (S - T)
            s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > rows, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                          # (Hkv, G*T)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float())
        return out.reshape(Hq, T, D).transpose(0, 1), lse.reshape(Hq, T).transpose(0, 1)
    # Many rows (prefill): the fused kernels that return the LSE.
    k, v = k.to(q.dtype), v.to(q.dtype)  # the KV may be stored in another dtype (--kv-dtype)
    causal = causal and T > 1
    if causal and S != T:  # the kernels align a causal mask top-left; split off the fully visible prefix
        o1, l1 = attention_lse(q, k[:, :S - T], v[:, :S - T], causal=False)
        o2, l2 = attention_lse(q, k[:, S - T:], v[:, S - T:], causal=True)
        return merge_attention([o1, o2], [l1, l2])
    if causal:
        qh = q.transpose(0, 1)[None]                                    # (1, Hq, T, D)
        kh = k.repeat_interleave(G, dim=0)[None] if G > 1 else k[None]  # a causal mask needs a head per query
        vh = v.repeat_interleave(G, dim=0)[None] if G > 1 else v[None]
    else:
        # Every key visible: fold the G query heads of a group into the query axis, (1, Hkv, G*T, D), so each
        # KV head is read once for its whole group and never repeated in memory.
        qh = q.transpose(0, 1).reshape(Hkv, G * T, D)[None]
        kh, vh = k[None], v[None]
    out, lse = _fused_lse(qh, kh, vh, causal, scale)
    L = qh.shape[2]
    return (out[0].reshape(Hq, T, D).transpose(0, 1).float(),
            lse[0, :, :L].reshape(Hq, T).transpose(0, 1).float())


def _fused_lse(qh, kh, vh, causal: bool, scale: float):
    """(out, lse) from the device's fused attention kernel (flash, or memory-efficient for fp32 on a GPU)."""
    if qh.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    if qh.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
    return torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, causal,
                                                                  scale=scale)[:2]


_CUDNN: dict[tuple, bool] = {}  # (head dim, dtype, causal) -> whether cuDNN attention runs that case here


def _gpu_lse(qh, kh, vh, causal: bool, scale: float):
    """out (1, Hq, T, D), lse (1, Hq, T) for 16-bit q (1, Hq, T, D) over k, v (1, Hkv, S, D) on a GPU.

    cuDNN's fused attention first: on an H100 it runs at ~650 TFLOP/s against flash's ~335 (both timed at the
    128K prefill shapes of Llama-3.1-8B), takes grouped KV heads as they are, and is what SDPA itself picks for a
    plain causal prefill there. Where cuDNN cannot run, flash with the group folded into the query axis (all
    keys visible) or with the KV heads repeated (causal: a mask needs a head per query)."""
    _, Hq, T, D = qh.shape
    Hkv = kh.shape[1]
    case = (D, qh.dtype, causal)
    if _CUDNN.get(case) is not False:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qh, kh, vh, None, True, 0.0, causal, False, scale=scale)[:2]
            _CUDNN[case] = True
            return out, lse.reshape(1, Hq, T)
        except RuntimeError:
            if _CUDNN.get(case):  # it ran before: this is a real error, not a missing backend
                raise
            _CUDNN[case] = False
    G = Hq // Hkv
    if causal and G > 1:
        kh, vh = kh.repeat_interleave(G, dim=1), vh.repeat_interleave(G, dim=1)
    elif G > 1:
        out, lse = _fused_lse(qh.reshape(1, Hkv, G * T, D), kh, vh, False, scale)
        return out.reshape(1, Hq, T, D), lse[:, :, :G * T].reshape(1, Hq, T)
    out, lse = _fused_lse(qh, kh, vh, causal, scale)
    return out, lse[:, :, :T]


class ChunkAttention:
    """Exact attention of T queries over keys given in parts, merged by log-sum-exp as they come.

    A chunked prefill sees its keys in parts: blocks of the stored prefix (every key visible) and the run that
    ends with the chunk itself (causal). With many query rows on a GPU each part runs in the fused attention
    kernel in its native head-major layout and is folded at once into one fp32 accumulator (rows (hq, t)) by
    `kernels.merge_into`, so partial outputs never pile up and are never re-laid out. Otherwise (decode, a
    CPU) parts go through `attention_lse` / `block_attention_lse` and a `RunningAttention`.
    """

    def __init__(self, q: torch.Tensor):
        self.q = q                                        # (T, Hq, D)
        T, Hq, D = q.shape
        self.fused = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and T > 16
        if self.fused:
            self.qh = q.transpose(0, 1).contiguous()[None]   # (1, Hq, T, D)
            self.acc = torch.zeros(Hq * T, D, dtype=torch.float32, device=q.device)
            self.acc_lse = torch.full((Hq * T,), float("-inf"), device=q.device)
        else:
            self.running = RunningAttention()

    def add(self, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> None:
        """Keys and values (Hkv, S, D). ``causal``: the run ends with the T query tokens themselves."""
        if not self.fused:
            part = recent_attention_lse(self.q, k.contiguous(), v.contiguous()) if causal else \
                attention_lse(self.q, k, v, causal=False)
            self.running.add(*part)
            return
        T, Hq, D = self.q.shape
        S = k.shape[1]
        if causal and S > T:  # the fused kernels align a causal mask top-left: the older rows go as a part
            self.add(k[:, :S - T], v[:, :S - T])
            k, v = k[:, S - T:], v[:, S - T:]
        if k.shape[1] == 0:
            return
        k, v = k.to(self.q.dtype).contiguous()[None], v.to(self.q.dtype).contiguous()[None]
        out, lse = _gpu_lse(self.qh, k, v, causal and T > 1, D ** -0.5)
        from ..kernels.merge_attention import merge_into

        merge_into(self.acc, self.acc_lse, out.reshape(Hq * T, D), lse.reshape(Hq * T).float())

    def add_pages(self, block: torch.Tensor) -> None:
        """A block of whole pages (n, 2, Hkv, P, D), every key visible."""
        if not self.fused:
            self.running.add(*block_attention_lse(self.q, block))
            return
        n, _, Hkv, P, D = block.shape
        keys = block[:, 0].transpose(0, 1).reshape(Hkv, n * P, D)
        self.add(keys, block[:, 1].transpose(0, 1).reshape(Hkv, n * P, D))

    def result(self) -> torch.Tensor:
        """The attention output (T, Hq, D) in q's dtype."""
        T, Hq, D = self.q.shape
        if not self.fused:
            return self.running.out.to(self.q.dtype)
        return self.acc.view(Hq, T, D).transpose(0, 1).to(self.q.dtype)


class RunningAttention:
    """Merges partial attentions one at a time, so only the running result and the newest part are alive
    (prefill parts are (T, Hq, D) each: keeping them all costs memory and traffic)."""

    def __init__(self):
        self.out: torch.Tensor | None = None  # (T, Hq, D) fp32
        self.lse: torch.Tensor | None = None  # (T, Hq) fp32

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.float(), lse
            return
        m = torch.maximum(self.lse, lse)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w_old, w_new = torch.exp(self.lse - m), torch.exp(lse - m)
        total = w_old + w_new
        self.out = (self.out * w_old[..., None] + out.float() * w_new[..., None]) / total[..., None]
        self.lse = m + torch.log(total)


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of disjoint key sets from each part's (out, lse).

    With m = max_i lse_i:  out = sum_i exp(lse_i - m) out_i / sum_i exp(lse_i - m),  lse = m + log(sum ...).
    A part that saw no keys has lse = -inf and weight 0.
    """
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses)                                      # (P, T, Hq)
    m = lse.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)                                       # (P, T, Hq)
    total = w.sum(dim=0)
    out = sum(w_i[..., None] * o for w_i, o in zip(w, outs)) / total[..., None]
    return out, m + torch.log(total)


def block_attention_lse(q: torch.Tensor, block: torch.Tensor, use_kernel: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (T, Hq, D) over a block of whole pages (n, 2, Hkv, P, D), all visible; (out, lse).

    On a GPU, for few query rows (decode), the pages are read in place by the sparse-attention kernel: seen
    with a head stride of P*D and a token stride of D, a block is a buffer of P-token chunks in which page
    j's keys are chunk j*2*Hkv (and its values the same chunk of the view shifted by Hkv*P*D elements).
    Elsewhere the block is laid out as (Hkv, n*P, D) and ``attention_lse`` runs. ``use_kernel`` forces the
    choice (tests run the kernel through Triton's interpreter on a CPU).
    """
    n, _, Hkv, P, D = block.shape
    T, Hq, _ = q.shape
    if use_kernel is None:
        use_kernel = q.is_cuda
    if use_kernel and block.dtype == q.dtype and block.is_contiguous() and (Hq // Hkv) * T <= 256:
        from ..kernels.sparse_attention import sparse_attention

        rows = ((n - 1) * 2 * Hkv + 1) * P  # the view's length: up to the last page's keys, within storage
        k = block.as_strided((Hkv, rows, D), (P * D, D, 1), block.storage_offset())
        v = block.as_strided((Hkv, rows, D), (P * D, D, 1), block.storage_offset() + Hkv * P * D)
        idx = (torch.arange(n, device=q.device, dtype=torch.int32) * (2 * Hkv)).expand(Hkv, n).contiguous()
        return sparse_attention(q, k_chunks=k, v_chunks=v, idx=idx, chunk_tokens=P)
    keys = block[:, 0].transpose(0, 1).reshape(Hkv, n * P, D)
    values = block[:, 1].transpose(0, 1).reshape(Hkv, n * P, D)
    return attention_lse(q, keys, values, causal=False)


def recent_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a short run (Hkv, S, D) that ends with the T query tokens themselves (causal)."""
    T, Hq, _ = q.shape
    if q.is_cuda and k.dtype == q.dtype and (Hq // k.shape[0]) * T <= 256:
        from ..kernels.sparse_attention import sparse_attention

        return sparse_attention(q, k, v, causal=True)
    return attention_lse(q, k, v, causal=True)
