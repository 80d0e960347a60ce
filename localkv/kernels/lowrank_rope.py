"""ShadowKV key rebuild: keys of the selected chunks from the low-rank factors, RoPE applied, in one pass.

The pre-RoPE keys of a layer, laid out ``[S, Hkv*D]``, are factored as ``U (S, r) @ SV``; ``SV`` is viewed
per KV head as ``(Hkv, r, D)`` (any strides: ShadowKV's ``[Hkv, D, r]`` works as ``sv.transpose(1, 2)``,
a ``(r, Hkv*D)`` matrix as ``sv.view(r, Hkv, D).permute(1, 0, 2)``). For the selected chunk ids
``idx (Hkv, n_sel)`` the op writes

    out[h, j*chunk + t] = rope(U[s] @ SV[h], pos[s]),   s = idx[h, j]*chunk + t

into ``out (Hkv, n_sel*chunk, D)``, or with ``dst (Hkv, n_sel)`` into the chunk slots ``dst[h, j]`` of ``out``
instead of ``j`` (ShadowKV's slot buffer, written in place). RoPE is the rotate-half layout of `localkv.models.rope`: with
``x = (x1, x2)`` the two halves, ``rope(x) = (x1*cos1 - x2*sin1, x2*cos2 + x1*sin2)`` where ``cos, sin
(P, D)`` are tables indexed by absolute position (``Rope.positions(torch.arange(P), dtype)`` gives them,
scalings and YaRN's attention factor included). ``pos (S,)`` maps token rows to positions (default: the
row index). Products accumulate in fp32; U and SV share a dtype (fp32/fp16/bf16); out may be any float.

Kernel: one program per (KV head, BLOCK_T selected tokens); the two halves of the key come from two dots
against the two column halves of SV, so the rotation needs no in-register permutation.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, _dot, check, dot_flags, interpreting, next_pow2, tl, triton, use_triton


@triton.jit
def _lowrank_rope_kernel(
    u_ptr, stride_us, stride_ur,            # U (S, r): elements between token rows / rank columns
    sv_ptr, stride_svh, stride_svr, stride_svd,  # SV (Hkv, r, D): elements between heads / rank rows / channels
    idx_ptr, stride_ih,                     # idx (Hkv, n_sel) chunk ids; elements between heads
    dst_ptr, stride_dh,                     # dst (Hkv, n_sel) output chunk slots (read only if HAS_DST)
    pos_ptr,                                # pos (S,) int positions of token rows (read only if HAS_POS)
    cos_ptr, sin_ptr, stride_cp, stride_sp,  # cos / sin tables (P, D): elements between positions
    out_ptr, stride_oh, stride_os,          # out (Hkv, n_sel*CHUNK, D): elements between heads / tokens
    n_sel, R, HALF,                         # selected chunks, rank, D/2
    CHUNK: tl.constexpr, HAS_POS: tl.constexpr, HAS_DST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,  # BLOCK_H >= D/2
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)       # KV head
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)   # output rows (selected tokens)
    mask_t = offs_t < n_sel * CHUNK
    chunk = tl.load(idx_ptr + h * stride_ih + offs_t // CHUNK, mask=mask_t, other=0).to(tl.int64)
    tok = chunk * CHUNK + offs_t % CHUNK                          # (BLOCK_T,) token row in U
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    acc1 = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)               # first half of the pre-RoPE key
    acc2 = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)               # second half
    sv_base = sv_ptr + h * stride_svh
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_ptr + tok[:, None] * stride_us + offs_r[None, :] * stride_ur,
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)           # (BLOCK_T, BLOCK_R)
        sv_rows = sv_base + offs_r[:, None] * stride_svr
        mask_rh = mask_r[:, None] & mask_h[None, :]
        sv1 = tl.load(sv_rows + offs_h[None, :] * stride_svd, mask=mask_rh, other=0.0)           # (BLOCK_R, BLOCK_H)
        sv2 = tl.load(sv_rows + (HALF + offs_h[None, :]) * stride_svd, mask=mask_rh, other=0.0)  # (BLOCK_R, BLOCK_H)
        acc1 += _dot(u, sv1, IEEE, UPCAST)
        acc2 += _dot(u, sv2, IEEE, UPCAST)
    if HAS_POS:
        p = tl.load(pos_ptr + tok, mask=mask_t, other=0).to(tl.int64)
    else:
        p = tok
    mask_th = mask_t[:, None] & mask_h[None, :]
    c_rows = cos_ptr + p[:, None] * stride_cp
    s_rows = sin_ptr + p[:, None] * stride_sp
    cos1 = tl.load(c_rows + offs_h[None, :], mask=mask_th, other=0.0).to(tl.float32)          # (BLOCK_T, BLOCK_H)
    cos2 = tl.load(c_rows + HALF + offs_h[None, :], mask=mask_th, other=0.0).to(tl.float32)
    sin1 = tl.load(s_rows + offs_h[None, :], mask=mask_th, other=0.0).to(tl.float32)
    sin2 = tl.load(s_rows + HALF + offs_h[None, :], mask=mask_th, other=0.0).to(tl.float32)
    if HAS_DST:
        slot = tl.load(dst_ptr + h * stride_dh + offs_t // CHUNK, mask=mask_t, other=0).to(tl.int64)
        o_t = slot * CHUNK + offs_t % CHUNK
    else:
        o_t = offs_t
    o_rows = out_ptr + h * stride_oh + o_t[:, None] * stride_os
    tl.store(o_rows + offs_h[None, :], (acc1 * cos1 - acc2 * sin1).to(out_ptr.dtype.element_ty), mask=mask_th)
    tl.store(o_rows + HALF + offs_h[None, :], (acc2 * cos2 + acc1 * sin2).to(out_ptr.dtype.element_ty), mask=mask_th)


def lowrank_rope_ref(u, sv, idx, cos, sin, out, *, pos=None, chunk_tokens: int = 8, dst=None):
    """Torch version of `lowrank_rope` (fp32 math); writes and returns ``out``."""
    Hkv, n_sel = idx.shape
    D = sv.shape[2]
    tok = (idx.long()[:, :, None] * chunk_tokens
           + torch.arange(chunk_tokens, device=idx.device)).reshape(Hkv, -1)   # (Hkv, n_sel*chunk)
    rows = u[tok.to(u.device)].to(sv.device)                                   # u may be on the host
    k = torch.bmm(rows.float(), sv.float())                                    # (Hkv, n_sel*chunk, D)
    p = pos.long()[tok] if pos is not None else tok
    c, s = cos[p].float(), sin[p].float()                                      # (Hkv, n_sel*chunk, D)
    k1, k2 = k[..., : D // 2], k[..., D // 2:]
    keys = k * c + torch.cat((-k2, k1), -1) * s
    if dst is None:
        out[:, : n_sel * chunk_tokens] = keys
    else:
        width = chunk_tokens * D
        out.view(Hkv, -1, width).scatter_(1, dst.long()[..., None].expand(-1, -1, width),
                                          keys.to(out.dtype).view(Hkv, n_sel, width))
    return out


def lowrank_rope(u, sv, idx, cos, sin, out, *, pos=None, chunk_tokens: int = 8, dst=None):
    """Rebuild the RoPE'd keys of selected chunks from ShadowKV's low-rank factors, into ``out``.

    Args:
        u: (S, r) left factor, one row per token (fp32/fp16/bf16); may be in pinned CPU memory when the rest
            is on a GPU (the kernel reads the selected rows over PCIe).
        sv: (Hkv, r, D) right factor per KV head, same dtype as u, any strides.
        idx: (Hkv, n_sel) int32/int64 chunk ids (chunk c = token rows c*chunk .. c*chunk+chunk-1 of u).
        cos, sin: (P, D) RoPE tables indexed by absolute position (rotate-half layout), any float dtype.
        out: (Hkv, >= n_sel*chunk_tokens, D) output buffer; rows [0, n_sel*chunk) are written.
        dst: optional (Hkv, n_sel) int32/int64 chunk slots of ``out`` (distinct per head), one per selected
            chunk: its keys go to rows ``dst*chunk ..`` instead (out[h] contiguous, whole chunks).
        pos: optional (S,) int positions of u's rows (default: the row index); must be < P.
        chunk_tokens: tokens per chunk.

    Returns:
        ``out``.
    """
    check(u.dim() == 2 and sv.dim() == 3 and sv.shape[1] == u.shape[1],
          f"u {tuple(u.shape)} / sv {tuple(sv.shape)}: want (S, r) / (Hkv, r, D)")
    check(u.dtype == sv.dtype, f"u dtype {u.dtype} != sv dtype {sv.dtype}")
    Hkv, R, D = sv.shape
    check(D % 2 == 0, f"head dim {D} must be even for RoPE")
    check(idx.dim() == 2 and idx.shape[0] == Hkv and idx.dtype in (torch.int32, torch.int64),
          f"idx must be (Hkv={Hkv}, n_sel) int32/int64, got {tuple(idx.shape)} {idx.dtype}")
    n_sel = idx.shape[1]
    check(cos.dim() == 2 and cos.shape[1] == D and sin.shape == cos.shape, f"cos/sin must be (P, D={D})")
    check(cos.stride(1) == 1 and sin.stride(1) == 1, "cos/sin: last dim must be contiguous")
    check(out.dim() == 3 and out.shape[0] == Hkv and out.shape[1] >= n_sel * chunk_tokens and out.shape[2] == D,
          f"out {tuple(out.shape)}: want (Hkv={Hkv}, >= {n_sel * chunk_tokens}, D={D})")
    check(out.stride(2) == 1, "out: last dim must be contiguous")
    check(pos is None or (pos.dim() == 1 and pos.shape[0] == u.shape[0]), "pos must be (S,)")
    check(dst is None or (dst.shape == idx.shape and out.is_contiguous() and out.shape[1] % chunk_tokens == 0),
          "dst must be idx's shape, into a contiguous out of whole chunks")
    if not use_triton(sv, idx, cos, sin, out, pos, dst, host=(u,)):
        return lowrank_rope_ref(u, sv, idx, cos, sin, out, pos=pos, chunk_tokens=chunk_tokens, dst=dst)
    if n_sel == 0:
        return out
    BLOCK_T = 32 if interpreting() else 64
    KERNEL_CALLS["lowrank_rope"] += 1
    _lowrank_rope_kernel[(Hkv, -(-n_sel * chunk_tokens // BLOCK_T))](
        u, u.stride(0), u.stride(1), sv, sv.stride(0), sv.stride(1), sv.stride(2),
        idx, idx.stride(0), dst if dst is not None else idx, (dst if dst is not None else idx).stride(0),
        pos if pos is not None else idx,
        cos, sin, cos.stride(0), sin.stride(0), out, out.stride(0), out.stride(1),
        n_sel, R, D // 2,
        CHUNK=chunk_tokens, HAS_POS=pos is not None, HAS_DST=dst is not None,
        BLOCK_T=BLOCK_T, BLOCK_R=32, BLOCK_H=max(16, next_pow2(D // 2)),
        **dot_flags(u.dtype), num_warps=8, num_stages=3,   # 8 warps: two (64, 64) fp32 accumulators
    )
    return out
