"""Rotary position embeddings with the scalings Llama-family configs use: llama3, linear, dynamic NTK, YaRN.

RoPE rotates each pair of channels (i, i + D/2) of a query or key at position p by the angle
p * inv_freq[i] ("rotate_half" layout, the layout of Hugging Face weights; GGUF loaders undo llama.cpp's
interleaved permutation so the same layout holds for them). The scalings only change ``inv_freq`` (and, for
YaRN, multiply cos/sin by an attention factor):

- linear:  inv_freq / factor                        (positions interpolated by ``factor``)
- llama3:  long wavelengths divided by ``factor``, short ones kept, a smooth blend between
- dynamic: the base grows with the sequence once it passes the trained length (NTK-aware)
- yarn:    a per-dimension blend of interpolated and extrapolated frequencies, cos/sin scaled
           by ``0.1 * ln(factor) + 1``

Keys are stored unrotated by the policies that need pre-RoPE keys (a low-rank factorisation of keys), so
the rotation is a helper anyone can call for any positions, not something the model bakes into its cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .args import ModelArgs


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low_freq_factor = s.get("low_freq_factor", 1.0)
    high_freq_factor = s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than the trained window are interpolated, shorter than a quarter of it kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(base: float, dim: int, s: dict, max_seq_len: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings") or max_seq_len
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    # Dimension index whose wavelength makes `rotations` turns over the trained length.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


@dataclass
class RotaryPositions:
    """Positions of a run of tokens with their cos/sin tables, shared by every layer of one forward."""

    pos: torch.Tensor
    """(T,) int64 absolute positions, consecutive."""
    start: int | None
    """``pos[0]`` as a Python int: reading it off the device would stall the CPU once per layer. None in a
    CUDA-graphed step, where ``pos`` is a static tensor each replay refills."""
    cos: torch.Tensor
    """(T, D) in the compute dtype."""
    sin: torch.Tensor
    rope: "Rope"

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (T, H, D) at these positions."""
        return apply_rotary(x, self.cos, self.sin)


def fused_small_ops(x: torch.Tensor) -> bool:
    """Whether a small op (RoPE, RMSNorm) on GPU activations ``x`` should run as one Triton kernel.

    Under CUDA-graph capture, always: the replay pays per kernel, not per Python call, and one kernel beats
    five. For many tokens (prefill), too: fewer passes over memory. An eager decode step is bound by the
    host's launch time, where torch's own kernels launch several times faster than a Triton launcher."""
    return x.shape[0] > 64 or torch.cuda.is_current_stream_capturing()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) rotated by cos/sin (T, D): x * cos + rotate_half(x) * sin."""
    if x.is_cuda and fused_small_ops(x):  # one kernel instead of five launches
        from ..kernels.rope import rope

        return rope(x, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, D) broadcast over heads
    return x * cos + rotate_half(x) * sin


class Rope:
    """The rotary embedding of one model: ``positions(pos)`` gives the tables for any positions."""

    def __init__(self, args: ModelArgs, device: torch.device | str = "cpu"):
        self.args = args
        self.dim = args.head_dim
        self.base = args.rope_theta
        self.scaling = args.rope_scaling or {}
        self.kind = self.scaling.get("rope_type", "default")
        self.attention_factor = 1.0
        inv_freq = _default_inv_freq(self.base, self.dim)
        if self.kind == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        elif self.kind == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(self.base, self.dim, self.scaling, args.max_seq_len)
        elif self.kind not in ("default", "dynamic"):
            raise ValueError(f"unsupported RoPE scaling {self.kind!r}")
        self.inv_freq = inv_freq.to(device)
        self._dynamic_len = args.max_seq_len  # sequence length the dynamic inv_freq was computed for

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # NTK-aware: grow the base so the longest wavelength stretches over seq_len (transformers' formula).
        if seq_len > self._dynamic_len:
            factor, trained = self.scaling["factor"], self.args.max_seq_len
            base = self.base * ((factor * seq_len / trained) - (factor - 1)) ** (self.dim / (self.dim - 2))
            self.inv_freq = _default_inv_freq(base, self.dim).to(self.inv_freq.device)
            self._dynamic_len = seq_len
        return self.inv_freq

    def positions(self, pos: torch.Tensor, dtype: torch.dtype, start: int | None = None,
                  static: bool = False) -> RotaryPositions:
        """cos/sin tables (T, D) for consecutive positions ``pos`` (T,), computed in fp32, cast to ``dtype``.

        ``start`` is ``pos[0]`` when the caller knows it (saves a device-to-host read). ``static``: ``pos`` is
        a CUDA graph's input, refilled before each replay; nothing is read back and ``start`` stays None."""
        inv_freq = self.inv_freq
        if self.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(pos.max()) + 1)
        freqs = pos.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        if start is None and not static:
            start = int(pos[0]) if pos.numel() else 0
        return RotaryPositions(pos, start, cos, sin, self)
