"""Which chunks a decode step attends to (the device buffer that keeps them between steps is `offload.chunks`).

    budget_chunks(budget, n, C)          the selection size: tokens, or a share of the context, in chunks
    select_chunks(q, landmarks, ...)     landmark scores -> the top-k chunks of each KV head

Everything stays on the device and has static shapes given the host-side sizes (k, slots): no value is read
back to decide anything, so a decode step never waits for the GPU here.
"""

from __future__ import annotations

import math

import torch

from ....kernels import chunk_scores, topk_ids
from ....kernels.topk_ids import ALIGN


DEFAULT_BUDGET_TOKENS = 2048
"""The default budget's floor: ShadowKV's own 2048 tokens. Below 128K that is more than 1/64 of the context, and
it has to be: on SmolLM2-135M (licence texts, 64 teacher-forced tokens, sink 64, 256 recent tokens, rank 128) a
budget of 1024 gives KL 0.003 / top-1 0.97 at 4K but only 0.022 / 0.91 at 8K, and 2048 gives 0.002 / 0.95 and
0.011 / 0.94 (docs/benchmarks.md, "Fidelity"); the old floor of 256 gave 0.036 / 0.88 at 4K, 0.072 / 0.78 at 8K."""


def budget_chunks(budget: int | float | None, n_tokens: int, chunk_tokens: int) -> int:
    """Chunks per KV head a step selects: ``budget`` tokens (int), a share of the context (float), or by
    default 1/64 of it (ShadowKV's 2048 of 128K) and at least `DEFAULT_BUDGET_TOKENS`."""
    if budget is None:
        tokens = max(DEFAULT_BUDGET_TOKENS, math.ceil(n_tokens / 64))
    elif isinstance(budget, float):
        tokens = math.ceil(budget * n_tokens)
    else:
        tokens = int(budget)
    return max(0, math.ceil(tokens / chunk_tokens))


def select_chunks(q: torch.Tensor, landmarks: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best chunks of each KV head, ids ascending.

    Score of chunk c for KV head h: ``max_g Σ_t softmax_c(q[t, h*G+g] · landmark[h, c] / sqrt(D))`` (summed over
    the query positions, max over the GQA group: `kernels.chunk_scores`); excluded chunks score -inf.

    Args:
        q: (T, Hq, D) post-RoPE queries, in the landmarks' dtype.
        landmarks: (Hkv, n_chunks, D).
        excluded: (Hkv, >= n_chunks) bool, chunks that must not be selected (sink, outliers); columns past
            n_chunks may hold anything. With ``ALIGN`` columns past them, and a row stride of a multiple of it,
            the select reads aligned rows (`kernels.topk_ids`: 17.7 µs against 21.5 at 128K on an H100).
        k: chunks per head, at most the number of chunks not excluded.

    Returns:
        (Hkv, k) int64.
    """
    Hkv, n = landmarks.shape[:2]
    width = min(-(-n // ALIGN) * ALIGN, excluded.shape[1])
    scores = torch.empty(Hkv, width, dtype=torch.float32, device=q.device)
    chunk_scores(q, landmarks, out=scores[:, :n])              # (Hkv, n_chunks) fp32, each in [0, T]
    # ids ascending (ties to the lowest): the attention sums in chunk order however the slots fell
    return topk_ids(scores, k, excluded=excluded[:, :width], valid=n)
