"""SwiGLU's gating in one pass: ``silu(gate) * up`` from the fused (gate|up) product of the MLP.

Eager torch runs it as two kernels (``F.silu``, then the product), each a launch of about 1.4 µs with next to
nothing to do for one decode token; in a CUDA-graphed decode step of an 8B model those launches, one pair a
layer, are a visible share of the step. One launch here, reading the product's row once: the gate is its
first half, up its second. The rounding is eager torch's: silu in fp32, rounded to the input dtype, then the
product in fp32 (exact for 16-bit operands), rounded once more.
"""

from __future__ import annotations

import torch

from ._common import KERNEL_CALLS, check, next_pow2, tl, triton, use_triton


@triton.jit
def _silu_mul_kernel(
    gu_ptr, stride_gr,       # gate_up (T, 2F): elements between rows; gate is columns [0, F), up [F, 2F)
    out_ptr, stride_or,      # out (T, F): elements between rows
    F,
    BLOCK_F: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)                      # one row (token) per program along axis 0
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)   # a block of F columns along axis 1
    mask = offs < F
    row = gu_ptr + r * stride_gr
    g = tl.load(row + offs, mask=mask, other=0.0)
    u = tl.load(row + F + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)             # silu in fp32, rounded to the input dtype as F.silu
    out = s.to(tl.float32) * u.to(tl.float32)              # exact in fp32 for 16-bit operands: one rounding
    tl.store(out_ptr + r * stride_or + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch ``F.silu(gate) * up`` over the halves of ``gate_up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the MLP's fused gate and up projections, in one kernel.

    Matches eager torch's ``F.silu(gate) * up`` in gate_up's dtype: on an H100, bf16 results were bit-equal
    (58.7M random elements); fp16 ones within two units in the last place, 3e-4 of them not bit-equal. The
    two sides' fp32 ``exp`` differ in their last bits, which can flip silu's rounding where its fp32 value
    lies next to a rounding boundary: one unit of silu, up to two of the product. fp32: a few fp32 units.

    Args:
        gate_up: (..., 2F), rows of the (gate|up) product: gate the first F columns, up the last F. Rows may
            be strided (a view into a wider product); columns are read contiguously.

    Returns:
        (..., F) in gate_up's dtype.
    """
    F2 = gate_up.shape[-1]
    check(F2 % 2 == 0, f"gate_up {tuple(gate_up.shape)}: want an even last dim (gate | up)")
    if not use_triton(gate_up):
        return silu_mul_ref(gate_up)
    F = F2 // 2
    gu = gate_up.reshape(-1, F2)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty(gu.shape[0], F, dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0] and F:
        KERNEL_CALLS["silu_mul"] += 1
        BLOCK_F = min(1024, next_pow2(F))
        grid = (gu.shape[0], triton.cdiv(F, BLOCK_F))
        _silu_mul_kernel[grid](gu, gu.stride(0), out, out.stride(0), F, BLOCK_F=BLOCK_F, num_warps=4)
    return out.view(*gate_up.shape[:-1], F)
