"""ShadowKV's chunk index for one layer: a landmark per chunk and KV head, and which chunks are outliers.

The sequence is cut into chunks of ``chunk_tokens`` (8) consecutive tokens; chunk c holds positions
``c*C .. c*C+C-1``. For each chunk and KV head, once its tokens leave the recent window:

- the **landmark** is the mean of its *post-RoPE* keys, ``(D,)``: a query's softmax over the landmarks
  stands in for its attention over the chunks (`selection.select_chunks`);
- its **coherence** is the lowest cosine similarity between one of its keys and that mean. The chunks least
  like their own mean are the ones a landmark represents worst: ShadowKV keeps the exact K/V of the
  lowest-coherence ~0.25% of chunks (per KV head) on the device as **outliers** and takes them out of the
  pool the selection draws from.

The sink chunks (the first ``sink_chunks``) are exact on the device too and likewise never selected. Both stay
in the softmax's normaliser, so a chunk's score is its share of the attention the landmarks predict over the
whole indexed prefix, as the attention itself would normalise it. (ShadowKV scores against the pool only.)
"""

from __future__ import annotations

import math

import torch

from ....kernels.topk_ids import ALIGN
from ...pages import pinned_empty


def index_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, host: bool, what: str
                ) -> torch.Tensor:
    """A zeroed buffer of the index: on ``device``, or in pinned CPU memory the GPU reads in place (``host``)."""
    if host:
        return pinned_empty(shape, dtype, what).zero_()
    return torch.zeros(shape, dtype=dtype, device=device)


def chunk_landmarks(keys: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks and coherence of whole chunks of rotated keys.

    Args:
        keys: (Hkv, m*chunk_tokens, D) post-RoPE keys of m consecutive chunks.
        chunk_tokens: tokens per chunk.

    Returns:
        landmarks (Hkv, m, D) in keys' dtype (means taken in fp32), coherence (Hkv, m) fp32: the minimum over the
        chunk's tokens of cos(key, landmark).
    """
    Hkv, n, D = keys.shape
    k = keys.float().view(Hkv, n // chunk_tokens, chunk_tokens, D)   # (Hkv, m, C, D)
    mean = k.mean(dim=2)                                              # (Hkv, m, D)
    cos = torch.nn.functional.cosine_similarity(k, mean[:, :, None], dim=-1, eps=1e-6)  # (Hkv, m, C)
    return mean.to(keys.dtype), cos.amin(dim=2)


def outlier_count(indexed_chunks: int, fraction: float, minimum: int) -> int:
    """Outlier chunks per KV head among ``indexed_chunks``: ``fraction`` of them, at least ``minimum``."""
    if indexed_chunks <= 0:
        return 0
    return min(indexed_chunks, max(minimum, math.ceil(fraction * indexed_chunks)))


class ChunkIndex:
    """Landmarks, coherence and the exclusion mask of one layer's sealed chunks (positions below ``sealed``)."""

    def __init__(self, n_kv_heads: int, head_dim: int, chunk_tokens: int, sink_chunks: int, *,
                 dtype: torch.dtype, device: torch.device, capacity_chunks: int, host: bool = False):
        self.Hkv, self.D, self.C = n_kv_heads, head_dim, chunk_tokens
        self.host = host and device.type == "cuda"
        """Landmarks in pinned CPU memory, scored by the GPU in place (`kernels.chunk_scores`)."""
        self.sink_chunks = sink_chunks
        self.dtype, self.device = dtype, device
        self.capacity = capacity_chunks
        self.chunks = 0
        """Sealed chunks: 0..chunks-1 have landmarks."""
        self.landmarks = self._landmark_buffer(0)                                          # (Hkv, alloc, D)
        self.coherence = torch.empty(n_kv_heads, 0, device=device)                         # (Hkv, alloc) fp32
        self.excluded = torch.empty(n_kv_heads, 0, dtype=torch.bool, device=device)        # sink + outliers
        self.outliers = torch.empty(n_kv_heads, 0, dtype=torch.long, device=device)        # (Hkv, n_out) sorted

    def _grow(self, n: int) -> None:
        size = self.landmarks.shape[1]
        if size >= n:
            return
        size = max(256, size)
        while size < n:
            size *= 2
        size = self.capacity if self.host else min(max(size, n), self.capacity)  # pinned memory: sized once
        size = -(-size // ALIGN) * ALIGN       # rows of whole aligned blocks: the select reads them vectorized
        Hkv = self.Hkv
        lm = self._landmark_buffer(size)
        coh = torch.full((Hkv, size), float("inf"), device=self.device)
        ex = torch.zeros(Hkv, size, dtype=torch.bool, device=self.device)
        old = self.landmarks.shape[1]
        lm[:, :old], coh[:, :old], ex[:, :old] = self.landmarks, self.coherence, self.excluded
        self.landmarks, self.coherence, self.excluded = lm, coh, ex

    def _landmark_buffer(self, size: int) -> torch.Tensor:
        return index_zeros((self.Hkv, size, self.D), self.dtype, self.device, self.host, "shadowkv landmarks")

    def seal(self, keys: torch.Tensor) -> None:
        """Add the chunks ``chunks ..`` from their rotated keys (Hkv, m*C, D)."""
        m = keys.shape[1] // self.C
        c0 = self.chunks
        self._grow(c0 + m)
        lm, coh = chunk_landmarks(keys, self.C)
        self.landmarks[:, c0:c0 + m] = lm.to(self.landmarks.device)
        self.coherence[:, c0:c0 + m] = coh
        sink = max(0, min(self.sink_chunks, c0 + m) - c0)  # sink chunks: exact, never outliers or selected
        self.coherence[:, c0:c0 + sink] = float("inf")
        self.excluded[:, c0:c0 + sink] = True
        self.chunks = c0 + m

    def truncate(self, chunks: int) -> None:
        """Forget the chunks from ``chunks`` on (their landmarks are rewritten when they are sealed again)."""
        if chunks < self.chunks:  # the caller chooses the outliers again (`set_outliers` clears the old ones)
            self.excluded[:, chunks:self.chunks] = False
            self.chunks = chunks

    def choose_outliers(self, n_out: int) -> torch.Tensor:
        """The ``n_out`` sealed non-sink chunks of lowest coherence, per KV head: (Hkv, n_out) sorted ids."""
        lo = min(self.sink_chunks, self.chunks)
        if n_out <= 0:
            return self.outliers[:, :0]
        worst = torch.topk(self.coherence[:, lo:self.chunks], n_out, dim=1, largest=False).indices + lo
        return worst.sort(dim=1).values

    def set_outliers(self, ids: torch.Tensor) -> None:
        """Make ``ids (Hkv, n_out)`` the outliers: excluded from selection (the old ones come back)."""
        heads = torch.arange(self.Hkv, device=self.device)[:, None]
        self.excluded[heads.expand_as(self.outliers), self.outliers] = False
        self.excluded[heads.expand_as(ids), ids] = True
        self.outliers = ids

    def device_bytes(self) -> int:
        held = (self.coherence, self.excluded, self.outliers) + (() if self.host else (self.landmarks,))
        return sum(t.numel() * t.element_size() for t in held)

    def host_bytes(self) -> int:
        return self.landmarks.numel() * self.landmarks.element_size() if self.host else 0
