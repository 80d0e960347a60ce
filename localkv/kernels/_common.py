"""What every kernel file shares: the Triton import (or a stub without it), the path choice, small helpers.

Path choice: a launcher runs its Triton kernel when ``TRITON_INTERPRET=1`` is set (the tests, on the CPU) or
when its tensors are on a CUDA device, and the torch reference otherwise. ``LOCALKV_KERNELS=ref`` forces the
reference everywhere (to bisect a suspected kernel bug). The environment is read at call time.

Triton decides interpreter vs compiler when a ``@triton.jit`` function is *defined* (its own library
functions included, when ``triton`` is imported), so ``TRITON_INTERPRET=1`` must be in the environment
before the first ``import triton`` / ``localkv.kernels`` of the process to interpret; `KERNELS_INTERPRETED`
records how the kernels were defined. tests/kernels/conftest.py sets it and checks.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels: the package still imports, every op takes its reference path
    HAS_TRITON = False

    class _Stub:
        """Enough of `triton` / `triton.language` for the kernel files to be defined, never run."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_a, **_kw):
            return lambda f: f

        @staticmethod
        def Config(*_a, **_kw):  # noqa: N802 (mirrors triton.Config)
            return None

    triton = tl = _Stub()  # type: ignore[assignment]


def _interpret_flag() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNELS_INTERPRETED = HAS_TRITON and _interpret_flag()
"""Whether this process defined its kernels (and Triton its own library) for the interpreter, at import."""


def interpreting() -> bool:
    """True when launches go through Triton's CPU interpreter: kernels defined for it and the flag still set."""
    return KERNELS_INTERPRETED and _interpret_flag()


KERNEL_CALLS: Counter[str] = Counter()
"""Triton launches per op name; tests read it to prove the kernel path ran, not the reference."""


def use_triton(*tensors: torch.Tensor | None, host: tuple = ()) -> bool:
    """Whether a launcher should run its Triton kernel for these tensors (``None`` entries are ignored).

    ``host`` names tensors the kernel may read in place from pinned CPU memory, over PCIe (ShadowKV's index
    when the GPU has no room for it), as long as the others are on the GPU."""
    if not HAS_TRITON or os.environ.get("LOCALKV_KERNELS", "") == "ref":
        return False
    if interpreting():
        return True
    present = [t for t in tensors if t is not None]
    readable = [t for t in host if t is not None]
    return (bool(present) and all(t.is_cuda for t in present)
            and all(t.is_cuda or t.is_pinned() for t in readable))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs for `_dot`: IEEE fp32 products for fp32 inputs (no silent TF32 on the GPU), and an upcast
    of 16-bit operands in the interpreter (Triton 3.9's interpreter multiplies bf16 bit patterns as ints)."""
    return {"IEEE": dtype == torch.float32, "UPCAST": interpreting() and dtype != torch.float32}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a (M, K) @ b (K, N) -> (M, N) fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def check(cond: bool, msg: str) -> None:
    """Shape/dtype contract checks of the launchers: a ValueError naming what was wrong."""
    if not cond:
        raise ValueError(msg)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def n_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in on the CPU interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2
