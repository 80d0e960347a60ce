"""Helpers shared by the kernel tests: device, dtypes, per-dtype tolerances, poisoned buffers."""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if not INTERPRET and torch.cuda.is_available() else "cpu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

TOL = {  # (atol, rtol) on outputs in the input dtype: fp32 tight, 16-bit at a few units of their rounding
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Close per the dtype's tolerance; NaN anywhere in ``actual`` (an unwritten poisoned element) fails."""
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (unwritten element?)"
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def poisoned(shape, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    """A buffer full of NaN (0xFF bytes for integer dtypes)."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=torch.int64, device=device).to(dtype)


def pinned_if_cuda(t: torch.Tensor) -> torch.Tensor:
    """A host tensor in pinned memory when a GPU runs the kernels (the gather's real setting)."""
    return t.pin_memory() if DEVICE.type == "cuda" else t
