"""KIVI-style asymmetric quantization of a KV page to int8 or int4 (two values per byte), and back.

A page is ``(H, T, D)`` (one layer's KV heads, a run of T tokens). Following KIVI (arXiv 2402.02750):

- **keys** (``kind="key"``) are quantized *per channel*: each channel gets its own scale/zero over a
  group of ``group`` consecutive tokens (outlier channels stay confined). scale/zero ``(H, ceil(T/group), D)``;
  a short last group is allowed.
- **values** (``kind="value"``) are quantized *per token*: scale/zero per token per group of ``group``
  consecutive channels. scale/zero ``(H, T, D/group)``.

Within a group, ``zero = min``, ``scale = (max - min) / (2^bits - 1)``, ``q = clamp(floor((x - zero)/scale
+ 0.5), 0, 2^bits - 1)`` (q = 0 where scale = 0), and ``x ≈ q*scale + zero`` with ``|x - x̂| <= scale/2``
(plus float rounding). ``zero`` is in value units, not an integer zero point. scale/zero are stored in
``scale_dtype`` (fp32 default) and the quantizer uses the stored (rounded) values, so dequantization sees
exactly what quantization assumed. Codes are unsigned: ``packed (H, T, D*bits/8)`` uint8; int8 is one code per
byte, int4 packs channel 2i in the low nibble and 2i+1 in the high nibble of byte i.

Kernels: one program per (head, token group) for keys, per (head, BLOCK_T tokens) for values; channels are
handled as (even, odd) pairs so a pair's two codes meet in one byte without register shuffles.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, interpreting, next_pow2, tl, triton, use_triton


@triton.jit
def _codes(x, zero, scale, QMAX: tl.constexpr):
    """fp32 values, zero, scale (broadcastable) -> int32 codes in [0, QMAX]."""
    q = tl.floor((x - zero) / tl.where(scale > 0, scale, 1.0) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX)
    return tl.where(scale > 0, q, 0.0).to(tl.int32)


@triton.jit
def _kv_quant_kernel(
    x_ptr, stride_xh, stride_xt,            # page (H, T, D): elements between heads / tokens; D contiguous
    p_ptr, stride_ph, stride_pt,            # packed codes (H, T, D*BITS/8) uint8: between heads / tokens
    sc_ptr, zp_ptr, stride_sh, stride_sr,   # scale / zero (H, rows, cols): between heads / rows; cols contiguous
    T, HALF,                                # tokens, D/2 (channel pairs)
    KEY: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,  # QMAX = 2^BITS - 1
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, N_GROUPS: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)   # keys: BLOCK_T = GROUP padded, one group
    mask_t = offs_t < T
    x_rows = x_ptr + h * stride_xh + offs_t[:, None] * stride_xt  # (BLOCK_T, 1)
    p_rows = p_ptr + h * stride_ph + offs_t[:, None] * stride_pt
    for k in tl.static_range(N_GROUPS):     # keys: one pass over all pairs; values: one per channel group
        if KEY:
            offs_p = tl.arange(0, BLOCK_P)                        # channel pairs (2p, 2p+1)
            mask_p = offs_p < HALF
        else:
            offs_p = k * (GROUP // 2) + tl.arange(0, BLOCK_P)     # pairs of channel group k
            mask_p = tl.arange(0, BLOCK_P) < GROUP // 2
        mask = mask_t[:, None] & mask_p[None, :]
        x_e = tl.load(x_rows + 2 * offs_p[None, :], mask=mask, other=0.0).to(tl.float32)      # (BLOCK_T, BLOCK_P)
        x_o = tl.load(x_rows + 2 * offs_p[None, :] + 1, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_P)
        big = float("inf")
        if KEY:
            # per channel over the group's tokens: (BLOCK_P,) each, for even and odd channels
            mn_e = tl.min(tl.where(mask, x_e, big), 0)
            mx_e = tl.max(tl.where(mask, x_e, -big), 0)
            mn_o = tl.min(tl.where(mask, x_o, big), 0)
            mx_o = tl.max(tl.where(mask, x_o, -big), 0)
            sc_e = ((mx_e - mn_e) / QMAX).to(sc_ptr.dtype.element_ty)
            sc_o = ((mx_o - mn_o) / QMAX).to(sc_ptr.dtype.element_ty)
            zp_e = mn_e.to(zp_ptr.dtype.element_ty)
            zp_o = mn_o.to(zp_ptr.dtype.element_ty)
            s_at = sc_ptr + h * stride_sh + tl.program_id(1) * stride_sr + 2 * offs_p     # (BLOCK_P,)
            z_at = zp_ptr + h * stride_sh + tl.program_id(1) * stride_sr + 2 * offs_p
            tl.store(s_at, sc_e, mask=mask_p)
            tl.store(s_at + 1, sc_o, mask=mask_p)
            tl.store(z_at, zp_e, mask=mask_p)
            tl.store(z_at + 1, zp_o, mask=mask_p)
            q_e = _codes(x_e, zp_e.to(tl.float32)[None, :], sc_e.to(tl.float32)[None, :], QMAX)
            q_o = _codes(x_o, zp_o.to(tl.float32)[None, :], sc_o.to(tl.float32)[None, :], QMAX)
        else:
            # per token over the group's channels: (BLOCK_T,)
            mn = tl.minimum(tl.min(tl.where(mask, x_e, big), 1), tl.min(tl.where(mask, x_o, big), 1))
            mx = tl.maximum(tl.max(tl.where(mask, x_e, -big), 1), tl.max(tl.where(mask, x_o, -big), 1))
            sc = ((mx - mn) / QMAX).to(sc_ptr.dtype.element_ty)
            zp = mn.to(zp_ptr.dtype.element_ty)
            at = h * stride_sh + offs_t * stride_sr + k                                    # (BLOCK_T,)
            tl.store(sc_ptr + at, sc, mask=mask_t)
            tl.store(zp_ptr + at, zp, mask=mask_t)
            q_e = _codes(x_e, zp.to(tl.float32)[:, None], sc.to(tl.float32)[:, None], QMAX)
            q_o = _codes(x_o, zp.to(tl.float32)[:, None], sc.to(tl.float32)[:, None], QMAX)
        if BITS == 4:
            tl.store(p_rows + offs_p[None, :], (q_e | (q_o << 4)).to(tl.uint8), mask=mask)
        else:
            tl.store(p_rows + 2 * offs_p[None, :], q_e.to(tl.uint8), mask=mask)
            tl.store(p_rows + 2 * offs_p[None, :] + 1, q_o.to(tl.uint8), mask=mask)


@triton.jit
def _kv_dequant_kernel(
    p_ptr, stride_ph, stride_pt,            # packed codes (H, T, D*BITS/8) uint8: between heads / tokens
    sc_ptr, zp_ptr, stride_sh, stride_sr,   # scale / zero (H, rows, cols): between heads / rows
    y_ptr, stride_yh, stride_yt,            # output page (H, T, D): between heads / tokens
    T, HALF,
    KEY: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, N_GROUPS: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    p_rows = p_ptr + h * stride_ph + offs_t[:, None] * stride_pt
    y_rows = y_ptr + h * stride_yh + offs_t[:, None] * stride_yt
    for k in tl.static_range(N_GROUPS):
        if KEY:
            offs_p = tl.arange(0, BLOCK_P)
            mask_p = offs_p < HALF
        else:
            offs_p = k * (GROUP // 2) + tl.arange(0, BLOCK_P)
            mask_p = tl.arange(0, BLOCK_P) < GROUP // 2
        mask = mask_t[:, None] & mask_p[None, :]
        if BITS == 4:
            b = tl.load(p_rows + offs_p[None, :], mask=mask, other=0).to(tl.int32)   # (BLOCK_T, BLOCK_P)
            q_e = (b & 15).to(tl.float32)
            q_o = (b >> 4).to(tl.float32)
        else:
            q_e = tl.load(p_rows + 2 * offs_p[None, :], mask=mask, other=0).to(tl.float32)
            q_o = tl.load(p_rows + 2 * offs_p[None, :] + 1, mask=mask, other=0).to(tl.float32)
        if KEY:
            s_at = sc_ptr + h * stride_sh + tl.program_id(1) * stride_sr + 2 * offs_p     # (BLOCK_P,)
            z_at = zp_ptr + h * stride_sh + tl.program_id(1) * stride_sr + 2 * offs_p
            y_e = q_e * tl.load(s_at, mask=mask_p, other=0.0).to(tl.float32)[None, :] \
                + tl.load(z_at, mask=mask_p, other=0.0).to(tl.float32)[None, :]
            y_o = q_o * tl.load(s_at + 1, mask=mask_p, other=0.0).to(tl.float32)[None, :] \
                + tl.load(z_at + 1, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            at = h * stride_sh + offs_t * stride_sr + k                                    # (BLOCK_T,)
            sc = tl.load(sc_ptr + at, mask=mask_t, other=0.0).to(tl.float32)[:, None]
            zp = tl.load(zp_ptr + at, mask=mask_t, other=0.0).to(tl.float32)[:, None]
            y_e = q_e * sc + zp
            y_o = q_o * sc + zp
        tl.store(y_rows + 2 * offs_p[None, :], y_e.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_rows + 2 * offs_p[None, :] + 1, y_o.to(y_ptr.dtype.element_ty), mask=mask)


def _expand(t: torch.Tensor, kind: str, group: int, T: int) -> torch.Tensor:
    """scale/zero -> one entry per element of the (H, T, D) page."""
    return t.repeat_interleave(group, 1)[:, :T] if kind == "key" else t.repeat_interleave(group, 2)


def quantize_page_ref(page, *, kind: str, bits: int = 4, group: int = 32, scale_dtype=torch.float32):
    """Torch version of `quantize_page` -> (packed, scale, zero)."""
    H, T, D = page.shape
    x = page.float()
    qmax = (1 << bits) - 1
    if kind == "key":
        n_groups = -(-T // group)
        pad = n_groups * group - T
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad))                        # (H, nG*group, D)
        valid = (torch.arange(n_groups * group, device=x.device) < T)[None, :, None]
        mn = xp.masked_fill(~valid, float("inf")).view(H, n_groups, group, D).amin(2)
        mx = xp.masked_fill(~valid, float("-inf")).view(H, n_groups, group, D).amax(2)
    else:
        mn = x.view(H, T, D // group, group).amin(-1)
        mx = x.view(H, T, D // group, group).amax(-1)
    scale = ((mx - mn) / qmax).to(scale_dtype)
    zero = mn.to(scale_dtype)
    s, z = _expand(scale.float(), kind, group, T), _expand(zero.float(), kind, group, T)
    q = torch.floor((x - z) / torch.where(s > 0, s, torch.ones_like(s)) + 0.5).clamp(0, qmax)
    q = torch.where(s > 0, q, torch.zeros_like(q)).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q
    return packed, scale, zero


def dequantize_page_ref(packed, scale, zero, *, kind: str, bits: int = 4, group: int = 32, dtype=torch.bfloat16):
    """Torch version of `dequantize_page` -> (H, T, D) page in ``dtype``."""
    H, T, _ = packed.shape
    q = torch.stack((packed & 15, packed >> 4), -1).reshape(H, T, -1) if bits == 4 else packed
    y = q.float() * _expand(scale.float(), kind, group, T) + _expand(zero.float(), kind, group, T)
    return y.to(dtype)


def _check_common(H, T, D, kind, bits, group):
    check(kind in ("key", "value"), f"kind must be 'key' or 'value', got {kind!r}")
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    check(D % 2 == 0 and group >= 2 and group % 2 == 0, f"head dim {D} and group {group} must be even")
    check(kind == "key" or D % group == 0, f"value groups: D={D} must be a multiple of group={group}")


def _grid_meta(H, T, D, kind, bits, group):
    if kind == "key":   # one token group per program, all channel pairs at once
        return (H, -(-T // group)), dict(KEY=True, BITS=bits, QMAX=(1 << bits) - 1, GROUP=group,
                                         BLOCK_T=next_pow2(group),
                                         BLOCK_P=next_pow2(D // 2), N_GROUPS=1)
    block_t = 16 if interpreting() else 32
    return (H, -(-T // block_t)), dict(KEY=False, BITS=bits, QMAX=(1 << bits) - 1, GROUP=group, BLOCK_T=block_t,
                                       BLOCK_P=next_pow2(group // 2), N_GROUPS=D // group)


def quantize_page(page, *, kind: str, bits: int = 4, group: int = 32, scale_dtype=torch.float32, out=None):
    """Quantize a KV page KIVI-style.

    Args:
        page: (H, T, D) fp32/fp16/bf16, last dim contiguous.
        kind: "key" (per-channel, groups of ``group`` tokens) or "value" (per-token, groups of ``group`` channels).
        bits: 8 or 4 (two codes per byte).
        group: group size (even; for values a divisor of D).
        scale_dtype: dtype of scale and zero (fp32 default; fp16/bf16 halve their size, slightly looser bound).
        out: optional (packed, scale, zero) buffers of the shapes below.

    Returns:
        (packed (H, T, D*bits/8) uint8, scale, zero), scale/zero (H, ceil(T/group), D) for keys,
        (H, T, D/group) for values.
    """
    check(page.dim() == 3, f"page must be (H, T, D), got {tuple(page.shape)}")
    H, T, D = page.shape
    _check_common(H, T, D, kind, bits, group)
    sshape = (H, -(-T // group), D) if kind == "key" else (H, T, D // group)
    if out is None:
        out = (torch.empty((H, T, D * bits // 8), dtype=torch.uint8, device=page.device),
               torch.empty(sshape, dtype=scale_dtype, device=page.device),
               torch.empty(sshape, dtype=scale_dtype, device=page.device))
    packed, scale, zero = out
    check(packed.shape == (H, T, D * bits // 8) and packed.dtype == torch.uint8, "packed buffer shape/dtype")
    check(scale.shape == sshape and zero.shape == sshape and scale.dtype == zero.dtype, "scale/zero buffer shapes")
    if not use_triton(page, packed, scale, zero):
        for buf, val in zip(out, quantize_page_ref(page, kind=kind, bits=bits, group=group, scale_dtype=scale.dtype)):
            buf.copy_(val)
        return out
    check(page.stride(2) == 1 and packed.stride(2) == 1 and scale.stride(2) == 1 and zero.stride() == scale.stride(),
          "last dims must be contiguous and scale/zero equally strided")
    if T == 0:
        return out
    grid, meta = _grid_meta(H, T, D, kind, bits, group)
    KERNEL_CALLS["quantize_page"] += 1
    _kv_quant_kernel[grid](page, page.stride(0), page.stride(1), packed, packed.stride(0), packed.stride(1),
                           scale, zero, scale.stride(0), scale.stride(1), T, D // 2, **meta)
    return out


def dequantize_page(packed, scale, zero, *, kind: str, bits: int = 4, group: int = 32,
                    dtype=torch.bfloat16, out=None):
    """Dequantize a page made by `quantize_page` (same kind, bits, group).

    Args:
        packed: (H, T, D*bits/8) uint8 codes.
        scale, zero: as returned by `quantize_page`.
        dtype: output dtype when ``out`` is not given.
        out: optional (H, T, D) buffer (last dim contiguous).

    Returns:
        (H, T, D) page.
    """
    check(packed.dim() == 3 and packed.dtype == torch.uint8, "packed must be (H, T, D*bits/8) uint8")
    H, T, PB = packed.shape
    D = PB * 8 // bits
    _check_common(H, T, D, kind, bits, group)
    sshape = (H, -(-T // group), D) if kind == "key" else (H, T, D // group)
    check(scale.shape == sshape and zero.shape == sshape, f"scale/zero must be {sshape}")
    if out is None:
        out = torch.empty((H, T, D), dtype=dtype, device=packed.device)
    check(out.shape == (H, T, D), f"out must be {(H, T, D)}")
    if not use_triton(packed, scale, zero, out):
        out.copy_(dequantize_page_ref(packed, scale, zero, kind=kind, bits=bits, group=group, dtype=out.dtype))
        return out
    check(packed.stride(2) == 1 and out.stride(2) == 1 and scale.stride(2) == 1 and zero.stride() == scale.stride(),
          "last dims must be contiguous and scale/zero equally strided")
    if T == 0:
        return out
    grid, meta = _grid_meta(H, T, D, kind, bits, group)
    KERNEL_CALLS["dequantize_page"] += 1
    _kv_dequant_kernel[grid](packed, packed.stride(0), packed.stride(1), scale, zero, scale.stride(0),
                             scale.stride(1), out, out.stride(0), out.stride(1), T, D // 2, **meta)
    return out
