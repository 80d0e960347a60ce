"""ShadowKV's low-rank keys for one layer: a basis of the pre-RoPE keys, every key kept as its coordinates.

The pre-RoPE keys of a layer, laid out ``[S, Hkv*D]`` (all KV heads side by side), are close to low rank. With
``B (Hkv*D, r)`` the top-r right singular vectors (orthonormal columns), key row k is kept as ``u = k B`` and
rebuilt as ``u Bᵀ``, losing only what lies outside the basis. On the device: ``U (S, r)``, one row per token
position, and ``SV = Bᵀ`` viewed ``(Hkv, r, D)``, the layout `kernels.lowrank_rope` reads.

The SVD goes through the Gram matrix ``G = Kᵀ K`` (Hkv*D square, fp32): its eigenvectors are K's right singular
vectors and its eigenvalues the squared singular values, and it grows by ``Kᵀ K`` of each new run of keys, so no
SVD ever needs every key in memory. When the basis changes is a function of the token sequence alone, not of how
the prompt was chunked, so a chat that was truncated, or saved and resumed, gets the same basis as one that
never was. Tokens are grouped in blocks of ``block_tokens``:

- before the first block is complete the basis is provisional: the layer asks for it (`provisional`) whenever
  it indexes, and it is the SVD of every key so far;
- at the end of the first block the basis is the SVD of that block;
- at the end of each later block, if the block's relative reconstruction error ``sqrt(Σ|k - u Bᵀ|² / Σ|k|²)``
  exceeds the basis's own fit error (``sqrt`` of the share of the energy of the keys it was fitted on that it
  leaves out) by more than ``refresh_error``, the basis is refreshed: SVD of every key up to there, then every
  U row recomputed from the keys in the store (rotated there; ``read_keys`` un-rotates them).

Without the exact keys (``refresh=False``: ShadowKV's ``exact_keys=False``, a store of values only) nothing can
be read back: the basis made at the end of the first block stays for good, as in the ShadowKV paper, and later
keys are projected onto it when they are appended (they are in hand then). The first block's keys are kept
(``first``, fp32) for its provisional bases, its SVD and a truncation back into it; past it no Gram sum is kept.

Measured on SmolLM2-135M (192 key columns), rank 32 leaves ~19% of the fitted keys' norm out and ~22% of later
keys', rank 64 11% and 15%: an absolute bound like 0.1 would refresh at every block, hence the margin over the fit.
Each basis made at a block end is kept on the host, so a truncation behind it restores the one before.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from .index import index_zeros

KeyReader = Callable[[int, int], Iterator[tuple[int, torch.Tensor]]]
"""``read_keys(a, b)`` yields ``(first position, pre-RoPE keys (t, Hkv*D) fp32)`` runs covering tokens a..b-1."""


def default_rank(n_kv_heads: int, head_dim: int) -> int:
    """ShadowKV's rank 160 for 1024 key columns (Llama-3-8B), scaled to the model, rounded up to 8, and at
    least 128 (or every column): on SmolLM2-135M (192 columns) the scaled rank 32 leaves ~20% of the keys' norm
    out and costs KL 0.17 / top-1 0.63 against exact at a full budget (1K context, 16 tokens); at 4K with a 1024
    budget rank 64 gave KL 0.012 / top-1 0.92, rank 128 KL 0.003 / top-1 0.97."""
    cols = n_kv_heads * head_dim
    return min(cols, max(128, -(-cols * 160 // 1024 // 8) * 8))


class LowRankKeys:
    """U (S, r) and SV (Hkv, r, D) of one layer's pre-RoPE keys, appended to and truncated with the sequence."""

    def __init__(self, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device,
                 capacity: int, read_keys: KeyReader, rank: int | None = None, rank_energy: float | None = None,
                 refresh_error: float = 0.1, block_tokens: int = 256, host: bool = False, refresh: bool = True):
        self.Hkv, self.D = n_kv_heads, head_dim
        self.host = host and device.type == "cuda"
        """U in pinned CPU memory, its rows read by the GPU in place (`kernels.lowrank_rope`)."""
        self.cols = n_kv_heads * head_dim
        self.dtype, self.device, self.capacity = dtype, device, capacity
        self.read_keys = read_keys
        self.rank_option = min(rank or default_rank(n_kv_heads, head_dim), self.cols)
        self.rank_energy = rank_energy
        self.refresh_error = refresh_error
        self.block = block_tokens
        self.refresh = refresh
        """False when no exact key can be read back: the first block's basis stays, and ``read_keys`` serves only
        the keys the caller still holds (ShadowKV's recent window), for a truncation."""
        self.first: torch.Tensor | None = None       # (block, cols) fp32: the first block's keys (refresh=False)
        self.rows = 0
        """Tokens appended: U rows 0..rows-1 are current (once a basis exists)."""
        self.u: torch.Tensor | None = None           # (allocated, r) in dtype
        self.basis: torch.Tensor | None = None       # (cols, r) fp32, orthonormal columns
        self.sv: torch.Tensor | None = None          # (Hkv, r, D) in dtype: basis.T per head
        self.fit_error = 0.0
        self.history: list[tuple[int, torch.Tensor, float]] = []  # (made at block end, basis on host, fit)
        f32 = dict(dtype=torch.float32, device=device)
        self.gram_full = torch.zeros(self.cols, self.cols, **f32)  # Kᵀ K over the complete blocks
        self.gram_part = torch.zeros(self.cols, self.cols, **f32)  # Kᵀ K over the block being filled
        self.part = torch.zeros(2, **f32)    # (Σ|k - u Bᵀ|², Σ|k|²) over the block being filled
        self.total = torch.zeros(2, **f32)   # the same over every token
        self.refreshes = 0
        self._reserved = 0
        self.pending: torch.Tensor | None = None   # (block, cols) fp32: keys parked by graphed steps
        self.parked = 0                           # rows - parked .. rows - 1 are parked there

    @property
    def rank(self) -> int:
        return 0 if self.basis is None else self.basis.shape[1]

    @property
    def fixed(self) -> bool:
        """The basis is made for good (``refresh=False`` and the first block complete): no Gram sums are kept."""
        return not self.refresh and bool(self.history)

    # -- appending ---------------------------------------------------------------------------------------
    def append(self, start: int, k: torch.Tensor) -> None:
        """Pre-RoPE keys ``k (T, Hkv, D)`` of tokens start.. (``start == rows``; their rotated copies are
        already in the store, which a refresh reads back, unless ``refresh=False``)."""
        assert start == self.rows, f"low-rank keys at {self.rows}, appended at {start}"
        self.flush()
        T = k.shape[0]
        flat = k.reshape(T, self.cols).float()                 # (T, cols)
        if not self.refresh and start < self.block:
            self._keep_first(start, flat[:self.block - start])
        self._reserved = start + T                             # a refresh mid-append sizes U for all of it
        self._ensure_rows(start + T)
        i = 0
        while i < T:                                           # pieces that end at block ends
            pos = start + i
            j = min(T, i + self.block - pos % self.block)
            piece = flat[i:j]
            if not self.fixed:
                self.gram_part.addmm_(piece.T, piece)
            if self.basis is not None:
                self._project(pos, piece, into_part=self.refresh)
            self.rows = start + j
            if self.rows % self.block == 0:
                self._block_end(self.rows)
            i = j

    def parking(self) -> torch.Tensor:
        """The buffer a CUDA-graphed step parks its key in, ``(block_tokens, cols)`` fp32: row ``position mod
        block_tokens`` (`kernels.rope_append` writes it), for a step the caller knows ends no block. The key's U
        row, Gram and error sums wait for the next eager call (`flush`), which any call that reads them makes
        first: no graphed step reads the U row of a token in the recent window, and the window seals only in
        an eager step. The host's ``rows`` is advanced by `advance`."""
        if self.pending is None:
            self.pending = torch.zeros(self.block, self.cols, dtype=torch.float32, device=self.device)
        return self.pending

    def advance(self, n: int) -> None:
        """The host's count after graphed steps parked ``n`` keys (`parking`)."""
        self.rows = self._reserved = self.rows + n
        self.parked += n

    @torch.inference_mode()   # also from stats(), outside it: the sums were made inside it
    def flush(self) -> None:
        """U rows, Gram and error sums of the keys parked by graphed steps: one matmul each for all of them.
        The parked rows lie in one block (a block end is an eager step, which flushes)."""
        if not self.parked:
            return
        a = self.rows - self.parked
        piece = self.pending[a % self.block:a % self.block + self.parked]
        self.parked = 0
        if not self.refresh and a < self.block:
            self._keep_first(a, piece)
        if not self.fixed:
            self.gram_part.addmm_(piece.T, piece)
        self._project(a, piece, into_part=self.refresh)

    def _keep_first(self, start: int, keys: torch.Tensor) -> None:
        """Keep keys (t, cols) of tokens start.. of the first block (``refresh=False``: the store has none)."""
        if self.first is None:
            self.first = torch.zeros(self.block, self.cols, dtype=torch.float32, device=self.device)
        self.first[start:start + keys.shape[0]] = keys

    def _project(self, pos: int, piece: torch.Tensor, into_part: bool) -> None:
        """U rows of ``piece (t, cols)`` at ``pos``, and its reconstruction sums."""
        c = piece @ self.basis                                 # (t, r) coordinates
        self.u[pos:pos + piece.shape[0]] = c.to(self.dtype)
        resid = piece - c @ self.basis.T                       # (t, cols) what the basis misses
        sums = torch.stack([resid.square().sum(), piece.square().sum()])
        self.total += sums
        if into_part:
            self.part += sums

    def _block_end(self, b: int) -> None:
        self.gram_full += self.gram_part
        self.gram_part.zero_()
        if not self.history:                                   # the first complete block: its own SVD
            self._refresh(b)
        elif self.refresh:
            res, norm = self.part.tolist()                     # a host read once per block of tokens
            if norm > 0 and math.sqrt(res / norm) > self.fit_error + self.refresh_error:
                self._refresh(b)
        self.part.zero_()

    def _refresh(self, b: int) -> None:
        """Basis = SVD of the keys of tokens 0..b-1 (``gram_full``); every U row recomputed."""
        basis, fit = self._svd(self.gram_full)
        self.history.append((b, basis.cpu(), fit))
        self._set_basis(basis, fit)
        self._reproject(self.rows)
        self.refreshes += 1

    def provisional(self) -> None:
        """Before the first block is complete: basis = SVD of every key so far (the layer calls this when it
        indexes chunks; cheap, fewer than ``block_tokens`` keys)."""
        self.flush()
        if 0 < self.rows < self.block:
            self._set_basis(*self._svd(self.gram_part))
            self._reproject(self.rows)

    # -- the basis ---------------------------------------------------------------------------------------
    def _svd(self, gram: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Top right singular vectors (cols, r) of the keys whose Gram matrix is ``gram``, and the fit error."""
        e, V = torch.linalg.eigh(gram.double())                # ascending eigenvalues = squared singular values
        e, V = e.flip(0).clamp(min=0), V.flip(1)
        energy = float(e.sum())
        r = self.rank_option
        if self.rank_energy is not None and energy > 0:        # the fewest directions holding that energy share
            captured = torch.cumsum(e, 0) / energy
            r = int(torch.searchsorted(captured, torch.tensor(self.rank_energy, dtype=e.dtype, device=e.device)))
            r = min(self.cols, r + 1)
        fit = math.sqrt(float(e[r:].sum()) / energy) if energy > 0 else 0.0
        return V[:, :r].float().contiguous(), fit

    def _set_basis(self, basis: torch.Tensor, fit: float) -> None:
        r = basis.shape[1]
        self.basis, self.fit_error = basis, fit
        self.sv = basis.T.contiguous().view(r, self.Hkv, self.D).permute(1, 0, 2).to(self.dtype)  # (Hkv, r, D)
        if self.u is not None and self.u.shape[1] != r:
            self.u = None
        self._ensure_rows(self.rows)

    def _reproject(self, n: int) -> None:
        """U rows and sums of tokens 0..n-1 under the current basis, from the keys in the store."""
        lb = n // self.block * self.block                      # first token of the block being filled
        self.total.zero_()
        self.part.zero_()
        for pos, keys in self._keys(0, n):
            for a, b in ((pos, min(pos + keys.shape[0], lb)), (max(pos, lb), pos + keys.shape[0])):
                if a < b:
                    self._project(a, keys[a - pos:b - pos], into_part=a >= lb)

    def _keys(self, a: int, b: int):
        """``read_keys(a, b)``, the first block's keys taken from ``first`` where they are kept."""
        if self.first is not None and a < min(b, self.block):
            yield a, self.first[a:min(b, self.block)]
            a = min(b, self.block)
        if a < b:
            yield from self.read_keys(a, b)

    def _ensure_rows(self, n: int) -> None:
        n = max(n, self._reserved)
        if self.basis is None:
            return
        if self.u is None or self.u.shape[0] < n:
            size = self.capacity if self.host else max(1024, self.u.shape[0] if self.u is not None else 0)
            while size < n:
                size *= 2
            u = index_zeros((min(max(size, n), self.capacity), self.rank), self.dtype, self.device, self.host,
                            "shadowkv low-rank keys")
            if self.u is not None:
                u[:self.rows] = self.u[:self.rows]
            self.u = u

    # -- truncation --------------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Keep tokens 0..n-1, as if the rest had never come: bases made after n are dropped (the one before
        returns), the Gram sums lose the dropped keys. Call before the store drops them."""
        if n >= self.rows:
            return
        self.flush()
        B = self.block
        lb, nb = self.rows // B * B, n // B * B
        popped = False
        while self.history and self.history[-1][0] > n:
            self.history.pop()
            popped = True
        if n < B:  # inside the first block: no basis until `provisional` makes one from these keys
            self.basis = self.sv = None
            self.fit_error = 0.0
            self.gram_full.zero_()
            self._restart_sums(n)
        elif popped:  # the basis in force at n returns: recompute everything from the keys
            _, basis, fit = self.history[-1]
            self._set_basis(basis.to(self.device), fit)
            self.gram_full.zero_()
            self._restart_sums(n)
        elif self.fixed:  # no basis will be made again: only the error sums lose the dropped keys
            for _, keys in self._keys(n, self.rows):
                self._sub_sums(keys, part=False)
        elif nb == lb:  # still in the same block: take the dropped keys out
            for _, keys in self._keys(n, self.rows):
                self.gram_part.addmm_(keys.T, keys, alpha=-1)
                self._sub_sums(keys, part=True)
        else:  # back into an earlier block: its partial sums from its keys, the complete ones lose theirs
            self.gram_part.zero_()
            self.part.zero_()
            for pos, keys in self._keys(nb, self.rows):
                end = pos + keys.shape[0]

                def span(a: int, b: int) -> torch.Tensor:
                    a, b = max(a, pos), min(b, end)
                    return keys[a - pos:max(a, b) - pos]

                old = span(nb, lb)                            # were in the complete blocks' Gram
                self.gram_full.addmm_(old.T, old, alpha=-1)
                kept = span(nb, n)                            # the new partial block
                self.gram_part.addmm_(kept.T, kept)
                if self.basis is not None:
                    self.part += self._sums(kept)
                    self.total -= self._sums(span(n, self.rows))
        self.rows = n

    def _restart_sums(self, n: int) -> None:
        """Gram matrices, U rows and sums of tokens 0..n-1 recomputed from the store."""
        nb = n // self.block * self.block
        self.gram_part.zero_()
        self.total.zero_()
        self.part.zero_()
        for pos, keys in self._keys(0, n):
            for a, b in ((pos, min(pos + keys.shape[0], nb)), (max(pos, nb), pos + keys.shape[0])):
                if a >= b:
                    continue
                run = keys[a - pos:b - pos]
                (self.gram_full if b <= nb else self.gram_part).addmm_(run.T, run)
                if self.basis is not None:
                    self._project(a, run, into_part=a >= nb)

    def _sums(self, keys: torch.Tensor) -> torch.Tensor:
        resid = keys - (keys @ self.basis) @ self.basis.T
        return torch.stack([resid.square().sum(), keys.square().sum()])

    def _sub_sums(self, keys: torch.Tensor, part: bool) -> None:
        if self.basis is not None:
            s = self._sums(keys)
            self.total -= s
            if part:
                self.part -= s

    # -- numbers -----------------------------------------------------------------------------------------
    def error(self) -> float:
        """Relative reconstruction error over every key, under the current basis (reads the device)."""
        self.flush()
        res, norm = self.total.tolist()
        return math.sqrt(max(res, 0.0) / norm) if norm > 0 else 0.0

    def device_bytes(self) -> int:
        held = [None if self.host else self.u, self.basis, self.sv, self.gram_full, self.gram_part, self.pending,
                self.first]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def host_bytes(self) -> int:
        return self.u.numel() * self.u.element_size() if self.host and self.u is not None else 0
