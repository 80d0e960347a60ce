"""One layer of the LouisKV policy: sink, indexed entries in the store, a recent window, and the trigger.

A layer holding ``n`` tokens splits them as

    0 .. S-1     the sink: exact on the device (and in the store, in order)
    S .. W-1     sealed: in the store only, as index entries (`index`): clustered input groups, their rows in
                 cluster order, and output segments in position order; a centroid per entry on the device
    W .. n-1     the window: exact on the device, in order, not yet in the store (the prompt's tail, the
                 recent generated tokens)

The store holds exactly the tokens ``0 .. W-1``: a token reaches it when it is indexed, so the input is written
already in cluster order. The exact prefill attends to the store's pages, then the window, then the chunk.

**Sealing.** The window's input tokens are clustered in groups of ``cluster_tokens`` as the prefill goes, and at
the first decode step the rest of the prompt but the last ``window_tokens``; generated tokens stay in the window
(the GPU buffer of recent segments) until ``output_tokens`` newer ones follow, then go to the store as segments
cut at the boundaries. Sealing happens only on a retrieving step, right before its selection.

**Decode.** Per step, ``r = mean over query heads of cos(q_{t-1}, q_t)`` (pre-RoPE). The step retrieves when
``r < tau`` (a semantic boundary, recorded for the output segments), after ``max_reuse`` steps without one, or when
the last selection is void (the first step after a prefill or a truncation). Retrieving seals, scores every entry,
takes the best ``k`` units per KV head (one selection per GQA group) and fetches the misses of the layer's unit
cache (`offload.chunks.ChunkBuffer`) from whichever tier holds them (`offload.disk_reads` for disk). Reusing
moves nothing: the last step's slots are attended again. One `kernels.sparse_attention` covers
``[sink | window]`` (causal) and the slots. With the budget covering every sealed unit this is exact attention.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from ....kernels import chunk_scores, sparse_attention, topk_ids
from ...chunks import ChunkBuffer, add_recall, keep_keys
from ...disk_reads import LayerChunks
from ...growing import Growing
from ...pages import KEYS, VALUES
from ...streamed import StreamedAttention
from .index import UNIT, cluster_order, segment_centroids, segment_units, unit_centroids


class LouisKVLayer:
    """The per-layer object attention calls (``prefill`` / ``decode``), with truncation and sessions."""

    def __init__(self, cache, layer: int):
        self.cache = weakref.proxy(cache)  # no cycle: the store goes with its cache
        self.layer = layer
        self.cfg = cfg = cache.config
        g = cache.store.geometry
        self.Hkv, self.D, self.dtype, self.device = g.n_kv_heads, g.head_dim, g.dtype, cache.store.device
        self.S, self.L = cfg.sink_tokens, cfg.window_tokens
        self.tau = cache.tau[layer]
        self.exact = StreamedAttention(cache, layer)
        self.chunks = LayerChunks(cache.store, layer, UNIT, cache.disk_blocks)
        self.buffer = ChunkBuffer(self.Hkv, UNIT, self.D, dtype=self.dtype, device=self.device,
                                  slot_factor=cache.cache_factor)
        self.n, self.W = 0, self.S
        empty = torch.zeros(self.Hkv, 0, self.D, dtype=self.dtype, device=self.device)
        self.sink_k = self.sink_v = self.win_k = self.win_v = empty
        most = cache.capacity // UNIT + 1
        self._centroid = Growing((self.Hkv, self.D), self.dtype, self.device, most)   # per entry
        self._unit_entry = Growing((1,), torch.long, self.device, most)              # sealed unit -> entry
        # Sealed pieces in order: (start, end, clustered, first entry). ``order`` holds, for store row r of head h
        # inside a piece, the token's offset from the piece's start (host int16: half the bytes of positions).
        self.pieces: list[tuple[int, int, bool, int]] = []
        self.order = np.empty((self.Hkv, cache.capacity), np.int16)
        self._copies: list[tuple] = []       # (start, pinned host order, event) still copying from the device
        self.boundaries: list[int] = []      # positions of the decode steps whose r fell under tau
        self.q_prev: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None   # the last retrieval's slots (None: void, the next step retrieves)
        self.sel: torch.Tensor | None = None
        self.since = 0                           # steps since the last retrieval
        self.all_k: torch.Tensor | None = None   # every rotated key in position order, kept only to measure recall
        self.last_step: tuple = (None, self.W, 0)

    # -- the steps attention calls ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)
        self.cache.begin_prefill(start)
        out = self.exact.prefill(q, k, v, rp, held=(self.win_k, self.win_v), write=False)
        self.cache.generated[start:start + k.shape[0]] = False
        self._append(start, rp.rotate(k), v)
        self._seal(full_groups=True)
        self.slots = None
        return out

    @torch.inference_mode()
    def decode(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)
        self._append(start, rp.rotate(k), v)
        cache = self.cache
        cache.generated[start:start + k.shape[0]] = True
        if self.layer == 0:
            cache.decode_tokens += k.shape[0]
            cache.step_retrieved = False
        q_now = q[-1].float()                                        # (Hq, D), pre-RoPE
        r = None
        if self.q_prev is not None:
            r = float(F.cosine_similarity(self.q_prev, q_now, dim=-1).mean())
            cache.similarity[self.layer].append(r)
        self.q_prev = q_now
        boundary = r is not None and r < self.tau
        if boundary:
            self.boundaries.append(start + k.shape[0] - 1)
        q_rot = rp.rotate(q).to(self.dtype)
        cache.layer_steps += 1
        if self.slots is None or boundary or self.since >= self.cfg.max_reuse:
            self._seal(full_groups=False)
            self._retrieve(q_rot)
        else:
            self.since += 1
        return self._attend(q_rot).to(q.dtype)

    @torch.inference_mode()
    def load(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rotated keys and values (T, Hkv, D) of tokens start.. from a saved session (or synthesized): as a prefill
        without queries."""
        if self.n > start:
            self.truncate(start)
        self.cache.generated[start:start + k.shape[0]] = False
        self._append(start, k, v)
        self._seal(full_groups=True)
        self.slots = None

    # -- growing and sealing ---------------------------------------------------------------------------------
    def _append(self, start: int, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens start.. (rotated keys, values (T, Hkv, D)) into the sink (and the store) and the window."""
        kt, vt = k_rot.transpose(0, 1).to(self.dtype), v.transpose(0, 1).to(self.dtype)   # (Hkv, T, D)
        if self.cfg.measure_recall:
            self.all_k = keep_keys(self.all_k, start, kt)
        s = max(0, min(self.S - start, kt.shape[1]))   # how many go to the sink
        if s:
            self.cache.store.write(self.layer, start, k_rot[:s], v[:s])
            self.sink_k = torch.cat([self.sink_k, kt[:, :s]], 1)
            self.sink_v = torch.cat([self.sink_v, vt[:, :s]], 1)
        self.win_k = torch.cat([self.win_k, kt[:, s:]], 1)
        self.win_v = torch.cat([self.win_v, vt[:, s:]], 1)
        self.n = start + kt.shape[1]

    def _seal(self, full_groups: bool) -> None:
        """Window tokens into the store and the index, oldest first: input in k-means groups (only whole groups of
        ``cluster_tokens`` with ``full_groups``) up to ``window_tokens`` from the end, generated tokens as segments
        once ``output_tokens`` newer ones follow. A unit holding both is indexed as output."""
        cfg = self.cfg
        horizon_in = (self.n - self.L) // UNIT * UNIT
        horizon_out = (self.n - cfg.output_tokens) // UNIT * UNIT
        while True:
            a = self.W
            span = self.cache.generated[a:self.n]
            inputs = int(np.argmax(span)) if span.any() else len(span)   # input tokens before the first generated
            if inputs >= UNIT:   # a whole unit of input: a k-means group
                end = min(a + inputs // UNIT * UNIT, horizon_in, a + cfg.cluster_tokens)
                if end <= a or (full_groups and end - a < cfg.cluster_tokens):
                    return
                self._seal_group(end - a)
                continue
            # generated tokens (the unit at a holds one): segments up to the unit where input starts again
            rest = span[inputs:]
            again = inputs + int(np.argmin(rest)) if len(rest) and not rest.all() else len(span)
            end = min(a + -(-again // UNIT) * UNIT if again < len(span) else self.n // UNIT * UNIT, horizon_out)
            if end <= a:
                return
            self._seal_segments(segment_units(a, end, self.boundaries, cfg.max_segment_tokens // UNIT))

    def _seal_group(self, N: int) -> None:
        """The window's first N input tokens clustered, written to the store in cluster order, one entry a unit."""
        a, keys, values = self.W, self.win_k[:, :N], self.win_v[:, :N]
        perm = cluster_order(keys, self.cfg.kmeans_iters)                            # (Hkv, N)
        idx = perm[..., None].expand(-1, -1, self.D)
        k_rows, v_rows = keys.gather(1, idx), values.gather(1, idx)
        self._store(a, N, k_rows, v_rows, unit_centroids(k_rows), [1] * (N // UNIT), clustered=True)
        if perm.is_cuda:   # copied without a sync, so clustering overlaps the rest of the prefill
            host = torch.empty(perm.shape, dtype=torch.int16, pin_memory=True)
            host.copy_(perm.to(torch.int16), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._copies.append((a, host, done))
        else:
            self.order[:, a:a + N] = perm.numpy()

    def _seal_segments(self, sizes: list[int]) -> None:
        """The window's first ``sum(sizes)`` units (generated tokens, in order), one entry a segment."""
        a, N = self.W, sum(sizes) * UNIT
        keys, values = self.win_k[:, :N], self.win_v[:, :N]
        self._store(a, N, keys, values, segment_centroids(keys, sizes), sizes, clustered=False)
        self.order[:, a:a + N] = np.arange(N, dtype=np.int16)

    def _store(self, a, N, k_rows, v_rows, centroids, sizes, clustered) -> None:
        first = self._centroid.n
        self.cache.store.write(self.layer, a, k_rows.transpose(0, 1), v_rows.transpose(0, 1))
        self._centroid.append(centroids.to(self.dtype))
        counts = torch.tensor(sizes, device=self.device)
        ids = torch.arange(first, first + len(sizes), device=self.device)
        self._unit_entry.append(ids.repeat_interleave(counts)[None])
        self.pieces.append((a, a + N, clustered, first))
        self.win_k, self.win_v = self.win_k[:, N:], self.win_v[:, N:]
        self.W = a + N

    # -- decode attention ------------------------------------------------------------------------------------
    def budget_units(self) -> int:
        """Units per KV head a retrieval selects: the budget in tokens, in units, at most the sealed ones."""
        return min(-(-self.cache.budget_tokens(self.n) // UNIT), (self.W - self.S) // UNIT)

    def _retrieve(self, q: torch.Tensor) -> None:
        """Score the entries, take the best units of each KV head, fetch the ones the unit cache misses."""
        cache, k = self.cache, self.budget_units()
        self.since = 0
        self.sel = self.slots = None
        if k <= 0:
            return
        cache.retrievals += 1
        cache.step_retrieved = True
        s0, n_units = self.S // UNIT, self.W // UNIT
        if k >= n_units - s0:   # every sealed unit: no scoring needed
            sel = torch.arange(s0, n_units, device=self.device).expand(self.Hkv, -1).contiguous()
        else:
            scores = chunk_scores(q, self._centroid.view)                             # (Hkv, C) fp32
            units = torch.full((self.Hkv, n_units), float("-inf"), device=self.device)
            units[:, s0:] = scores[:, self._unit_entry.view[0]]
            excluded = torch.zeros(self.Hkv, n_units, dtype=torch.bool, device=self.device)
            excluded[:, :s0] = True
            sel = topk_ids(units, k, excluded=excluded)
        self.buffer.reserve(k, n_units)
        slots, dst = self.buffer.assign(sel, cache.hits)
        self.chunks.begin_step()
        self.chunks.fetch(KEYS, sel, dst, self.buffer.k, cache.moved)    # misses only (dst >= 0)
        self.chunks.fetch(VALUES, sel, dst, self.buffer.v, cache.moved)
        cache.selected_units += k * self.Hkv
        self.sel, self.slots = sel, slots

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of the newest T queries (T, Hq, D) (post-RoPE, KV dtype) over [sink | window] + the slots."""
        dense_k = torch.cat([self.sink_k, self.win_k], 1)   # ends with the queries' own tokens
        dense_v = torch.cat([self.sink_v, self.win_v], 1)
        if self.slots is None:
            out, _ = sparse_attention(q, dense_k, dense_v, causal=True)
        else:
            out, _ = sparse_attention(q, dense_k, dense_v, self.buffer.k, self.buffer.v, self.slots,
                                      chunk_tokens=UNIT, causal=True)
        self.last_step = (self.sel, self.W, self.n)
        if self.cfg.measure_recall:
            add_recall(self.cache.recall, q, self.all_k[:, :self.n], self.covered(self.sel, self.W, self.n))
        return out

    def _orders(self) -> np.ndarray:
        """``order``, with the copies of the device's permutations landed."""
        for a, host, done in self._copies:
            done.synchronize()
            self.order[:, a:a + host.shape[1]] = host.numpy()
        self._copies.clear()
        return self.order

    def positions(self, rows: np.ndarray, h: int) -> np.ndarray:
        """Token positions of store rows ``rows`` (sealed, int64) of head ``h``."""
        order = self._orders()
        starts = np.array([p[0] for p in self.pieces] or [0], np.int64)
        piece = np.searchsorted(starts, rows, side="right") - 1
        out = rows.copy()
        sealed = (rows >= self.S) & (piece >= 0)
        out[sealed] = starts[piece[sealed]] + order[h, rows[sealed]]
        return out

    def covered(self, sel: torch.Tensor | None, W: int, n: int) -> torch.Tensor:
        """(Hkv, n) bool: the tokens a step with selection ``sel`` attends, [sink | selected | window]."""
        covered = torch.zeros(self.Hkv, n, dtype=torch.bool, device=self.device)
        covered[:, :min(self.S, n)] = True
        covered[:, W:] = True
        if sel is not None:
            rows = (sel.cpu()[:, :, None] * UNIT + torch.arange(UNIT)).flatten(1).numpy()
            for h in range(self.Hkv):
                covered[h, torch.from_numpy(self.positions(rows[h], h)).to(self.device)] = True
        return covered

    # -- sessions and rolling back ---------------------------------------------------------------------------
    def piece_tokens(self, part: int, a: int, b: int, clustered: bool) -> torch.Tensor:
        """K or V (Hkv, b - a, D) of sealed piece [a, b), in position order."""
        rows = torch.cat([r for _, r in self.chunks.token_runs(part, a, b)], 1).to(self.dtype)
        if not clustered:
            return rows
        perm = torch.from_numpy(self._orders()[:, a:b].astype(np.int64)).to(self.device)   # row -> offset
        out = torch.empty_like(rows)
        out.scatter_(1, perm[..., None].expand(-1, -1, self.D), rows)
        return out

    def token_runs(self, n_tokens: int):
        """Rotated (K, V) (Hkv, t, D) runs of tokens 0..n_tokens-1, in position order (sessions)."""
        s = min(self.S, n_tokens)
        if s:
            yield self.sink_k[:, :s], self.sink_v[:, :s]
        for a, b, clustered, _ in self.pieces:
            if a >= n_tokens:
                return
            k, v = (self.piece_tokens(p, a, b, clustered) for p in (KEYS, VALUES))
            yield k[:, :n_tokens - a], v[:, :n_tokens - a]
        if n_tokens > self.W:
            yield self.win_k[:, :n_tokens - self.W], self.win_v[:, :n_tokens - self.W]

    @torch.inference_mode()
    def truncate(self, m: int) -> None:
        """Keep tokens 0..m-1: the piece holding m and every later one go back to the window, in order."""
        if m >= self.n:
            return
        self._orders()   # no copy in flight into rows that the cut may hand to other tokens
        self.slots = self.sel = None
        self.q_prev = None
        self.boundaries = [b for b in self.boundaries if b < m]
        if m >= self.W:
            self.win_k, self.win_v = self.win_k[:, :m - self.W], self.win_v[:, :m - self.W]
            self.n = m
            return
        keep = [p for p in self.pieces if p[1] <= m]
        cut = self.pieces[len(keep)] if m > self.S and len(keep) < len(self.pieces) else None
        W = keep[-1][1] if keep else self.S
        if cut is not None and cut[0] < m:   # the piece holding m: its kept tokens back to the window
            win = [self.piece_tokens(p, cut[0], cut[1], cut[2])[:, :m - cut[0]] for p in (KEYS, VALUES)]
        else:
            win = [self.win_k[:, :0]] * 2
        self.cache.disk_blocks.forget_from(self.layer, min(W, m) // self.cache.store.geometry.page_tokens)
        self.cache.store.truncate_layer(self.layer, min(W, m))
        self.chunks.invalidate()
        self.chunks.begin_step()
        entries = self.pieces[len(keep)][3] if len(keep) < len(self.pieces) else self._centroid.n
        self._centroid.truncate(entries)
        self._unit_entry.truncate((W - self.S) // UNIT)
        self.buffer.forget_from(W // UNIT)
        self.pieces = keep
        self.sink_k, self.sink_v = self.sink_k[:, :m], self.sink_v[:, :m]
        self.win_k, self.win_v = win
        self.W, self.n = W, m

    def device_bytes(self) -> int:
        held = [self.sink_k, self.sink_v, self.win_k, self.win_v] + ([self.all_k] if self.all_k is not None else [])
        grown = self._centroid.nbytes() + self._unit_entry.nbytes()
        return self.buffer.device_bytes() + grown + sum(t.numel() * t.element_size() for t in held)

    def entries(self) -> tuple[int, int]:
        """(clustered units, output segments) indexed."""
        clustered = sum((b - a) // UNIT for a, b, c, _ in self.pieces if c)
        return clustered, self._centroid.n - clustered
