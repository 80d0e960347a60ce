"""Kernel tests run the Triton kernels through the CPU interpreter, against the torch references.

Shared helpers (tolerance table, poisoned buffers) live in kernel_testing.py.

``TRITON_INTERPRET=1`` is set here, at import, before anything imports triton (Triton decides interpreter
vs compiler when a kernel is defined). On a CUDA machine, ``TRITON_INTERPRET=0 pytest tests/kernels`` runs
the same tests compiled, on the GPU. Inputs are fresh random tensors every run (no fixed seed); output
buffers start poisoned so an element the kernel forgot to write fails.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from localkv.kernels import _common  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if INTERPRET and _common.HAS_TRITON and not _common.KERNELS_INTERPRETED:
    raise pytest.UsageError("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1: "
                            "run `TRITON_INTERPRET=1 pytest ...`")


@pytest.fixture
def kernel_ran():
    """``kernel_ran(op)`` asserts that the Triton kernel of ``op`` ran since the test started."""
    before = _common.KERNEL_CALLS.copy()

    def check(op: str) -> None:
        assert _common.KERNEL_CALLS[op] > before[op], f"{op}: the Triton kernel did not run (reference path taken)"

    return check
