"""Decode attention over a dense segment and/or an index list of chunks, GQA, split-K, returning the LSE.

Queries ``q (Tq, Hq, D)`` are the Tq = 1..16 newest tokens, already RoPE'd; query head ``hq`` reads KV head
``hq // G`` (``G = Hq / Hkv``). The keys/values come in two parts, either may be absent:

- **dense** ``k_dense, v_dense (Hkv, S, D)``: a contiguous run (local window, outliers, generated tokens).
  With ``causal=True`` the segment *ends with the Tq query tokens themselves* (their K/V already appended):
  query t sees dense rows ``j <= S - Tq + t``. With ``causal=False`` every dense row is visible. A CUDA-graphed
  decode step passes a fixed-size buffer with its filled length in a device tensor ``dense_len``: rows past
  it are not read, and S above means that length.
- **chunks** ``k_chunks, v_chunks (Hkv, n_slots * chunk_tokens, D)``: a buffer of chunk slots, and
  ``idx (Hkv, n_sel)`` int32/int64 slot ids per KV head; all selected tokens are visible (they are older).

Returns ``out (Tq, Hq, D)`` in q's dtype and ``lse (Tq, Hq)`` fp32, the natural log of ``Σ exp(q·k * sm_scale)``
over the visible keys, so results over other tiers combine exactly with `merge_attention`. A query with no
visible key gets out = 0, lse = -inf.

Kernel plan: one program per (KV head, split); the G*Tq query rows of a group are folded into the M
dimension of the tile so each K/V block is read once per group. The splits cover the dense segment and the
chunk list separately (``split_tokens`` each), each program streams its range with an online softmax and
writes an fp32 partial (out, lse); `merge_attention`'s kernel reduces the splits.
"""

from __future__ import annotations

import math

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, n_sms, next_pow2, tl, triton, use_triton
from .merge_attention import launch_merge

_LN2 = math.log(2.0)


@triton.jit
def _attend_block(acc, m_i, l_i, q, kT, v, valid, qk_scale, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step. acc (BLOCK_M, BLOCK_D) fp32, m_i / l_i (BLOCK_M,) fp32 in log2 units;
    q (BLOCK_M, BLOCK_D), kT (BLOCK_D, BLOCK_N), v (BLOCK_N, BLOCK_D); valid broadcasts to (BLOCK_M, BLOCK_N)."""
    s = _dot(q, kT, IEEE, UPCAST) * qk_scale                # (BLOCK_M, BLOCK_N) scores * log2(e)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))                   # (BLOCK_M,)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet: keep exp2 finite
    p = tl.exp2(s - m_safe[:, None])                        # (BLOCK_M, BLOCK_N), 0 where masked
    alpha = tl.exp2(m_i - m_safe)                           # rescale of what was accumulated so far
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)  # (BLOCK_M, BLOCK_D)
    return acc, m_new, l_i


@triton.jit
def _sparse_attention_kernel(
    q_ptr, stride_qt, stride_qh,            # q (Tq, Hq, D): elements between tokens / heads; D contiguous
    kd_ptr, vd_ptr,                         # dense k / v (Hkv, S, D)
    stride_kdh, stride_kds,                 # dense k: elements between heads / tokens
    stride_vdh, stride_vds,                 # dense v: elements between heads / tokens
    kc_ptr, vc_ptr,                         # chunk buffers k / v (Hkv, n_slots*CHUNK, D)
    stride_kch, stride_kcs,                 # chunk k: elements between heads / tokens
    stride_vch, stride_vcs,                 # chunk v: elements between heads / tokens
    idx_ptr, stride_ih,                     # idx (Hkv, n_sel) slot ids; elements between heads
    o_ptr, stride_op, stride_ot, stride_oh,  # partial out (n_splits, Tq, Hq, D) fp32: split / token / head
    lse_ptr, stride_lp, stride_lt, stride_lh,  # partial lse (n_splits, Tq, Hq) fp32: split / token / head
    len_ptr,                                # (1,) int32 filled dense length, read when HAS_LEN
    Tq, S, n_sel, D,                        # query tokens, dense length, selected chunks, head dim
    qk_scale,                               # sm_scale * log2(e)
    split_tokens, n_dense_splits,           # tokens per split; splits [0, n_dense_splits) are dense
    G: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    if HAS_LEN:
        S = tl.load(len_ptr)                # splits were laid out over the buffer; those past S do nothing
    h = tl.program_id(0)                    # KV head
    sp = tl.program_id(1)                   # split
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)          # query rows of the group: m = g * Tq + t
    g = offs_m // Tq
    t = offs_m % Tq
    mask_m = offs_m < G * Tq
    hq = h * G + g                          # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + t[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)            # (BLOCK_M, BLOCK_D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)   # running max score (log2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                  # running Σ exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)          # running Σ p v

    if sp < n_dense_splits:
        # ---- dense segment: rows [start, end) of k_dense[h] ----
        start = sp * split_tokens
        end = tl.minimum(start + split_tokens, S)
        k_base = kd_ptr + h64 * stride_kdh
        v_base = vd_ptr + h64 * stride_vdh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            kT = tl.load(k_base + offs_n[None, :] * stride_kds + offs_d[:, None],
                         mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + offs_n[:, None] * stride_vds + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)   # (BLOCK_N, BLOCK_D)
            valid = mask_n[None, :]                                           # (1, BLOCK_N)
            if CAUSAL:
                # query t sits at dense row S - Tq + t and sees rows up to it
                valid = valid & (offs_n[None, :] <= (S - Tq + t)[:, None])    # (BLOCK_M, BLOCK_N)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kT, v, valid, qk_scale, IEEE, UPCAST)
    else:
        # ---- chunk list: virtual tokens [start, end) of the concatenation of the selected chunks ----
        start = (sp - n_dense_splits) * split_tokens
        end = tl.minimum(start + split_tokens, n_sel * CHUNK)
        k_base = kc_ptr + h64 * stride_kch
        v_base = vc_ptr + h64 * stride_vch
        i_base = idx_ptr + h64 * stride_ih
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slot = tl.load(i_base + offs_n // CHUNK, mask=mask_n, other=0).to(tl.int64)  # (BLOCK_N,)
            row = slot * CHUNK + offs_n % CHUNK                                          # buffer row
            kT = tl.load(k_base + row[None, :] * stride_kcs + offs_d[:, None],
                         mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_base + row[:, None] * stride_vcs + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)   # (BLOCK_N, BLOCK_D)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kT, v, mask_n[None, :], qk_scale, IEEE, UPCAST)

    has = l_i > 0                                            # rows that saw at least one key
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]                              # 0 for rows with no key (acc = 0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    o_rows = o_ptr + sp * stride_op + t * stride_ot + hq * stride_oh                  # (BLOCK_M,)
    tl.store(o_rows[:, None] + offs_d[None, :], out, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + sp * stride_lp + t * stride_lt + hq * stride_lh, lse, mask=mask_m)


# Swept on an H100 (128K-token lists, graphed): small tiles with deep pipelines win,
# 32-64 keys x 3-5 stages at 2-4 warps, all within 2% of each other; 128-key tiles at 5 stages overflow smem.
_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(32, 4, 4), (32, 4, 5), (64, 2, 4), (64, 4, 3), (64, 4, 2)]]
_sparse_attention_tuned = triton.autotune(_CONFIGS, key=["BLOCK_M", "BLOCK_D", "CHUNK", "CAUSAL", "HAS_LEN"])(
    _sparse_attention_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gather_chunks(x: torch.Tensor, idx: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """x (Hkv, n_slots*chunk, D), idx (Hkv, n_sel) -> (Hkv, n_sel*chunk, D): the selected chunks in list order."""
    Hkv, _, D = x.shape
    heads = torch.arange(Hkv, device=x.device)[:, None]
    return x.reshape(Hkv, -1, chunk_tokens, D)[heads, idx.long()].reshape(Hkv, -1, D)


def sparse_attention_ref(q, k_dense=None, v_dense=None, k_chunks=None, v_chunks=None, idx=None, *,
                         chunk_tokens: int = 8, causal: bool = True, sm_scale: float | None = None,
                         dense_len: torch.Tensor | None = None):
    """Torch version of `sparse_attention` (fp32 math): gathers the chunks, then masked softmax attention."""
    if dense_len is not None and k_dense is not None:
        n = int(dense_len.reshape(-1)[0])
        k_dense, v_dense = k_dense[:, :n], v_dense[:, :n]
    Tq, Hq, D = q.shape
    Hkv = (k_dense if k_dense is not None else k_chunks).shape[0]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else D ** -0.5
    ks, vs, vis = [], [], []
    if k_dense is not None:
        S = k_dense.shape[1]
        ks.append(k_dense.float())
        vs.append(v_dense.float())
        j = torch.arange(S, device=q.device)[None, :]
        seen = j <= (S - Tq + torch.arange(Tq, device=q.device))[:, None] if causal else j >= 0
        vis.append(seen.expand(Tq, S))                                  # (Tq, S)
    if k_chunks is not None:
        ks.append(_gather_chunks(k_chunks, idx, chunk_tokens).float())
        vs.append(_gather_chunks(v_chunks, idx, chunk_tokens).float())
        vis.append(torch.ones(Tq, ks[-1].shape[1], dtype=torch.bool, device=q.device))
    K, V, seen = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(vis, 1)  # (Hkv, L, D) x2, (Tq, L)
    qg = q.float().transpose(0, 1).reshape(Hkv, G * Tq, D)              # rows (g, t)
    s = (qg @ K.transpose(1, 2)) * scale                                 # (Hkv, G*Tq, L)
    s = s.masked_fill(~seen.repeat(G, 1), float("-inf"))
    lse = torch.logsumexp(s, -1)                                         # (Hkv, G*Tq), -inf if nothing seen
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = p @ V                                                            # (Hkv, G*Tq, D)
    out = o.reshape(Hq, Tq, D).transpose(0, 1).to(q.dtype)
    return out, lse.reshape(Hq, Tq).transpose(0, 1).contiguous()


def _nonempty(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """A tensor safe to pass as a pointer the kernel never reads (absent or empty tensors have no storage)."""
    if t is None or t.numel() == 0:
        return torch.zeros((1,) * ndim, dtype=dtype, device=like.device)
    return t


def sparse_attention(q, k_dense=None, v_dense=None, k_chunks=None, v_chunks=None, idx=None, *,
                     chunk_tokens: int = 8, causal: bool = True, sm_scale: float | None = None,
                     split_tokens: int | None = None, out=None, lse_out=None,
                     dense_len: torch.Tensor | None = None):
    """Attention of the newest Tq queries over a dense KV segment and/or selected chunks.

    Args:
        q: (Tq, Hq, D) queries (RoPE'd), fp32/fp16/bf16.
        k_dense, v_dense: (Hkv, S, D) dense segment, same dtype as q, or None. See ``causal``.
        k_chunks, v_chunks: (Hkv, n_slots * chunk_tokens, D) chunk buffers, same dtype as q, or None.
        idx: (Hkv, n_sel) int32/int64 slot ids into the chunk buffers (n_sel may be 0); ids must be in range.
        chunk_tokens: tokens per chunk slot.
        causal: the dense segment ends with the Tq query tokens (query t sees dense rows <= S - Tq + t);
            False: all dense rows visible.
        sm_scale: score scale, default 1/sqrt(D).
        split_tokens: tokens per split-K program (default: enough splits to fill the GPU ~4 times).
        out: optional (Tq, Hq, D) output buffer (contiguous); lse_out: optional (Tq, Hq) fp32 buffer.
        dense_len: optional (1,) int32 device tensor, the filled length of the dense segment (at most S):
            the step reads no host value, so a CUDA graph can replay it as the segment fills.

    Returns:
        (out (Tq, Hq, D) in q's dtype, lse (Tq, Hq) fp32 natural-log LSE of the scaled scores).
    """
    check(q.dim() == 3, f"q must be (Tq, Hq, D), got {tuple(q.shape)}")
    Tq, Hq, D = q.shape
    check((k_dense is None) == (v_dense is None), "give both k_dense and v_dense or neither")
    check((k_chunks is None) == (v_chunks is None) == (idx is None), "give k_chunks, v_chunks and idx together")
    check(k_dense is not None or k_chunks is not None, "sparse_attention needs a dense segment or chunks")
    Hkv = (k_dense if k_dense is not None else k_chunks).shape[0]
    check(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    S = 0
    for name, x in (("k_dense", k_dense), ("v_dense", v_dense), ("k_chunks", k_chunks), ("v_chunks", v_chunks)):
        if x is None:
            continue
        check(x.dim() == 3 and x.shape[0] == Hkv and x.shape[2] == D,
              f"{name} {tuple(x.shape)}: want (Hkv={Hkv}, *, D={D})")
        check(x.dtype == q.dtype, f"{name} dtype {x.dtype} != q dtype {q.dtype}")
        check(x.stride(2) == 1 or x.numel() == 0, f"{name}: last dim must be contiguous")
    if k_dense is not None:
        S = k_dense.shape[1]
        check(v_dense.shape == k_dense.shape, "k_dense and v_dense shapes differ")
    n_sel = 0
    if k_chunks is not None:
        check(v_chunks.shape == k_chunks.shape, "k_chunks and v_chunks shapes differ")
        check(k_chunks.shape[1] % chunk_tokens == 0,
              f"chunk buffer rows {k_chunks.shape[1]} not a multiple of {chunk_tokens}")
        check(idx.dim() == 2 and idx.shape[0] == Hkv, f"idx must be (Hkv={Hkv}, n_sel), got {tuple(idx.shape)}")
        check(idx.dtype in (torch.int32, torch.int64), f"idx must be int32/int64, got {idx.dtype}")
        n_sel = idx.shape[1]
    if out is None:
        out = torch.empty((Tq, Hq, D), dtype=q.dtype, device=q.device)
    if lse_out is None:
        lse_out = torch.empty((Tq, Hq), dtype=torch.float32, device=q.device)
    check(out.shape == (Tq, Hq, D) and out.is_contiguous(), "out must be a contiguous (Tq, Hq, D) tensor")
    check(lse_out.shape == (Tq, Hq) and lse_out.dtype == torch.float32 and lse_out.is_contiguous(),
          "lse_out must be a contiguous fp32 (Tq, Hq) tensor")
    scale = sm_scale if sm_scale is not None else D ** -0.5

    if not use_triton(q, k_dense, v_dense, k_chunks, v_chunks, idx, out):
        o, lse = sparse_attention_ref(q, k_dense, v_dense, k_chunks, v_chunks, idx,
                                      chunk_tokens=chunk_tokens, causal=causal, sm_scale=scale,
                                      dense_len=dense_len)
        out.copy_(o)
        lse_out.copy_(lse)
        return out, lse_out

    check(G * Tq <= 256, f"G*Tq = {G * Tq} query rows per group: at most 256")
    check(q.stride(2) == 1, "q: last dim must be contiguous")
    if split_tokens is None:
        # Splits per KV head to fill the GPU ~4 times over (single-token queries) or ~2 times (several: each
        # program then does more math per byte, and fewer, longer splits stream better; swept on an H100).
        per_head = _cdiv((4 if G * Tq <= 16 else 2) * n_sms(q.device), Hkv)
        split_tokens = max(256, _cdiv(_cdiv(S + n_sel * chunk_tokens, per_head), 256) * 256)
    check(split_tokens >= 1, "split_tokens must be positive")
    n_dense = _cdiv(S, split_tokens)
    n_splits = max(1, n_dense + _cdiv(n_sel * chunk_tokens, split_tokens))
    o_part = torch.empty((n_splits, Tq, Hq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((n_splits, Tq, Hq), dtype=torch.float32, device=q.device)
    kd = _nonempty(k_dense, q, q.dtype, 3)
    vd = _nonempty(v_dense, q, q.dtype, 3)
    kc = _nonempty(k_chunks, q, q.dtype, 3)
    vc = _nonempty(v_chunks, q, q.dtype, 3)
    ix = _nonempty(idx, q, torch.int32, 2)
    has_len = dense_len is not None and k_dense is not None
    if has_len:
        check(dense_len.dtype == torch.int32 and dense_len.numel() == 1, "dense_len must be one int32 element")
    ln = dense_len if has_len else ix
    args = (q, q.stride(0), q.stride(1),
            kd, vd, kd.stride(0), kd.stride(-2), vd.stride(0), vd.stride(-2),
            kc, vc, kc.stride(0), kc.stride(-2), vc.stride(0), vc.stride(-2),
            ix, ix.stride(0),
            o_part, *o_part.stride()[:3], lse_part, *lse_part.stride(),
            ln, Tq, S, n_sel, D, scale * 1.4426950408889634, split_tokens, n_dense)
    meta = dict(G=G, CHUNK=chunk_tokens, CAUSAL=causal, HAS_LEN=has_len, BLOCK_M=max(16, next_pow2(G * Tq)),
                BLOCK_D=max(16, next_pow2(D)), **dot_flags(q.dtype))
    KERNEL_CALLS["sparse_attention"] += 1
    if interpreting():
        _sparse_attention_kernel[(Hkv, n_splits)](*args, BLOCK_N=16, **meta)
    else:
        _sparse_attention_tuned[(Hkv, n_splits)](*args, **meta)
    launch_merge(o_part.view(n_splits, Tq * Hq, D), lse_part.view(n_splits, Tq * Hq),
                 out.view(Tq * Hq, D), lse_out.view(Tq * Hq))
    return out, lse_out
