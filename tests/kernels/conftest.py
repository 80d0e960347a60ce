"""Kernel tests: the Triton kernels (through the CPU interpreter when there is no GPU) against the torch references.

Shared helpers (tolerance table, poisoned buffers) live in kernel_testing.py.

Without a GPU, ``TRITON_INTERPRET=1`` is set here, at import, before anything imports triton (Triton decides
interpreter vs compiler when a kernel is defined; importing torch does not import triton). With a GPU the
same tests run compiled on it, and the rest of the session (tests/test_gpu.py) keeps compiled kernels;
``TRITON_INTERPRET=1 pytest tests/kernels`` forces the interpreter there. Inputs are fresh random tensors
every run (no fixed seed); output buffers start poisoned so an element the kernel forgot to write fails.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from localkv.kernels import _common  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET and _common.HAS_TRITON and not _common.KERNELS_INTERPRETED:
    raise pytest.UsageError("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: "
                            "run `TRITON_INTERPRET=1 pytest ...`")
if not _common.HAS_TRITON:   # no triton wheel for this platform: only the references exist
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def kernel_ran():
    """``kernel_ran(op)`` asserts that the Triton kernel of ``op`` ran since the test started."""
    before = _common.KERNEL_CALLS.copy()

    def check(op: str) -> None:
        assert _common.KERNEL_CALLS[op] > before[op], f"{op}: the Triton kernel did not run (reference path taken)"

    return check
