"""Which chunks a decode step attends to, and the device buffer that keeps selected chunks between steps.

    budget_chunks(budget, n, C)          the selection size: tokens, or a share of the context, in chunks
    select_chunks(q, landmarks, ...)     landmark scores -> the top-k chunks of each KV head
    ChunkBuffer.assign(sel)              a slot per selected chunk; chunks already in a slot are hits
    attention_recall(q, keys, covered)   the exact attention mass the attended tokens hold (measurement only)

Everything stays on the device and has static shapes given the host-side sizes (k, slots): no value is read
back to decide anything, so a decode step never waits for the GPU here.
"""

from __future__ import annotations

import math

import torch

from ....kernels import assign_slots, chunk_scores, topk_ids
from ....kernels.topk_ids import ALIGN


def budget_chunks(budget: int | float | None, n_tokens: int, chunk_tokens: int) -> int:
    """Chunks per KV head a step selects: ``budget`` tokens (int), a share of the context (float), or by
    default ~1.5% of it (1/64, ShadowKV's 2048 of 128K) and at least 256 tokens."""
    if budget is None:
        tokens = max(256, math.ceil(n_tokens / 64))
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


class ChunkBuffer:
    """Device slots holding the rebuilt keys and fetched values of selected chunks, per KV head.

    ``k``, ``v`` are (Hkv, n_slots*C, D): slot s of head h is rows s*C .. s*C+C-1, the layout
    `kernels.sparse_attention` reads through an index list. ``slot_chunk`` (Hkv, n_slots+1) says which chunk
    each slot holds (-1: none) and ``chunk_slot`` (Hkv, n_chunks+1) the reverse; their last column is a
    scratch target for masked scatters. A step's selection keeps the slots of its hits and puts each miss in
    the least recently used slot no hit holds (`kernels.assign_slots`); with ``n_slots >= k`` there are always
    enough.
    """

    def __init__(self, n_kv_heads: int, chunk_tokens: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, slot_factor: float = 2.0):
        self.Hkv, self.C, self.D = n_kv_heads, chunk_tokens, head_dim
        self.dtype, self.device = dtype, device
        self.slot_factor = slot_factor
        self.n_slots = 0
        self.n_chunks = 0
        self.step = torch.zeros(n_kv_heads, dtype=torch.int32, device=device)  # on the device: graphs replay assign
        self._alloc(0, 0)

    def _alloc(self, n_slots: int, n_chunks: int) -> None:
        Hkv, C, D, dev = self.Hkv, self.C, self.D, self.device
        self.k = torch.zeros(Hkv, n_slots * C, D, dtype=self.dtype, device=dev)
        self.v = torch.zeros(Hkv, n_slots * C, D, dtype=self.dtype, device=dev)
        self.slot_chunk = torch.full((Hkv, n_slots + 1), -1, dtype=torch.long, device=dev)
        self.slot_age = torch.zeros(Hkv, n_slots + 1, dtype=torch.int32, device=dev)  # int32: the kernel's keys
        self.chunk_slot = torch.full((Hkv, n_chunks + 1), -1, dtype=torch.long, device=dev)
        self.n_slots, self.n_chunks = n_slots, n_chunks

    def reserve(self, k: int, n_chunks: int) -> None:
        """Room for a selection of ``k`` chunks among ``n_chunks`` (a resize empties the buffer)."""
        if k > self.n_slots:
            self._alloc(max(k, math.ceil(k * self.slot_factor)), max(n_chunks, self.n_chunks))
        if n_chunks > self.n_chunks:
            grown = torch.full((self.Hkv, 2 * n_chunks + 1), -1, dtype=torch.long, device=self.device)
            grown[:, :self.n_chunks] = self.chunk_slot[:, :self.n_chunks]
            self.chunk_slot, self.n_chunks = grown, 2 * n_chunks

    def assign(self, sel: torch.Tensor, hits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the chunks ``sel (Hkv, k)`` (distinct per head): `kernels.assign_slots`.

        Returns:
            slots (Hkv, k): where each selected chunk is (or will be once fetched);
            dst (Hkv, k): the slot to fetch into, -1 for hits (the fetch's skip mask).
        ``hits``, an optional int64 counter, is added the number of hits.
        """
        return assign_slots(sel, self.chunk_slot, self.slot_chunk, self.slot_age, self.step, self.n_slots, hits)

    def forget_from(self, chunk: int) -> None:
        """Drop every buffered chunk from ``chunk`` on (their tokens were truncated and may come back different)."""
        stale = self.slot_chunk[:, :self.n_slots] >= chunk
        self.slot_chunk[:, :self.n_slots].masked_fill_(stale, -1)
        self.slot_age[:, :self.n_slots].masked_fill_(stale, 0)
        self.chunk_slot[:, chunk:self.n_chunks] = -1

    def device_bytes(self) -> int:
        held = (self.k, self.v, self.slot_chunk, self.slot_age, self.chunk_slot)
        return sum(t.numel() * t.element_size() for t in held)

    def buffers(self) -> tuple[int, ...]:
        """Addresses a graphed step reads: they change when `reserve` grows the buffer."""
        return tuple(t.data_ptr() for t in (self.k, self.v, self.slot_chunk, self.slot_age, self.chunk_slot))


def attention_recall(q: torch.Tensor, keys: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Share of each query head's exact softmax attention that falls on the covered tokens.

    Args:
        q: (T, Hq, D) post-RoPE queries of the newest T tokens.
        keys: (Hkv, n, D) every rotated key so far, the last T being the queries' own (causal).
        covered: (Hkv, n) bool, the tokens the policy attended.

    Returns:
        (T, Hq) fp32 recall in [0, 1].
    """
    T, Hq, D = q.shape
    Hkv, n, _ = keys.shape
    G = Hq // Hkv
    qg = q.float().transpose(0, 1).reshape(Hkv, G * T, D)       # rows (g, t)
    s = (qg @ keys.float().transpose(1, 2)) * D ** -0.5         # (Hkv, G*T, n)
    rows = torch.arange(T, device=q.device).repeat(G)[:, None] + (n - T)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(s, dim=-1)
    recall = (p * covered[:, None, :]).sum(-1)                  # (Hkv, G*T)
    return recall.reshape(Hq, T).T
