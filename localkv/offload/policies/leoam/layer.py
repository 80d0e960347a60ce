"""One layer of the LeoAM policy: sink, recent window, sealed chunks with min/max abstracts, and the steps.

A layer holding ``n`` tokens splits them as

    0 .. S-1     the sink: exact on the device
    S .. W-1     sealed blocks of B tokens, cut into chunks (`chunking`), each with kmin/kmax (Hkv, C, D) on the
                 device; their K and V live only in the store and are gathered, in 16-token units, when selected
    W .. n-1     the recent window: exact on the device (the prompt's tail and the generated tokens)

Block ``[W, W+B)`` is sealed once ``n >= W + B + L`` (``L = max(score_queries, window_tokens)``): the ``Wq``
queries after it have given their unit rows (`chunking.unit_rows`, computed as those queries arrive, in prefill
or decode), and ``L`` tokens stay exact after it. Sealing happens after the step's attention, so a step's own
tokens are always in the window.

A decode step scores every chunk with the upper bound ``max_{g,t} Σ_d max(q_d kmin_d, q_d kmax_d)``
(`kernels.chunk_scores`, max over the GQA group), gives each unit its chunk's score and takes the ``k`` best
units per KV head (`kernels.topk_ids`, ties to the lowest id): whole chunks in score order until the budget of
``16 k`` tokens is filled, the last one cut to fit. The units' slots in the LRU chunk cache
(`offload.chunks.ChunkBuffer`, ``cache_factor * k`` units a head) are reused; only misses are fetched from
whichever tier holds them (`offload.chunks.StoreChunks`; from disk only the 4 KB blocks holding them, through
`offload.disk_reads`: threads, a host cache, and this step's prefetch of the next layer's blocks of its last step).
One `kernels.sparse_attention` over the dense part
``[sink | window]`` (causal) and the slots gives the exact attention over the attended tokens. With the budget
covering every sealed unit this is exact attention.
"""

from __future__ import annotations

import weakref

import torch

from ....kernels import chunk_scores, quantize_minmax, sparse_attention, topk_ids
from ...chunks import ChunkBuffer, add_recall, keep_keys
from ...disk_reads import LayerChunks
from ...growing import Growing
from ...pages import KEYS, VALUES
from ...streamed import StreamedAttention
from .chunking import UNIT, abstracts, cut_fixed, cut_variable, unit_rows


class LeoAMLayer:
    """The per-layer object attention calls (``prefill`` / ``decode``), with truncation and session loading."""

    def __init__(self, cache, layer: int):
        self.cache = weakref.proxy(cache)  # no cycle: the store goes with its cache
        self.layer = layer
        self.cfg = cfg = cache.config
        g = cache.store.geometry
        self.Hkv, self.D, self.dtype, self.device = g.n_kv_heads, g.head_dim, g.dtype, cache.store.device
        self.S, self.B, self.Wq = cfg.sink_tokens, cfg.block_tokens, cfg.score_queries
        self.L = max(cfg.score_queries, cfg.window_tokens)
        self.exact = StreamedAttention(cache, layer)
        self.chunks = LayerChunks(cache.store, layer, UNIT, cache.disk_blocks)
        # Each layer's own chunk cache, or with cache_factor 0 the one buffer the layers share, emptied every step
        self.buffer = cache.shared_buffer or ChunkBuffer(self.Hkv, UNIT, self.D, dtype=self.dtype, device=self.device,
                                                         slot_factor=cache.cache_factor)
        self.n = 0
        self.W = self.S
        empty = torch.zeros(self.Hkv, 0, self.D, dtype=self.dtype, device=self.device)
        self.sink_k = self.sink_v = self.win_k = self.win_v = empty
        # Abstracts of the sealed chunks, (Hkv, C, D) in the KV dtype, or int8 with a scale (Hkv, C) each: held
        # for the most chunks the context can have (one a unit), so that a long context never grows them.
        most = cache.capacity // UNIT + 1
        adt = torch.int8 if cache.int8_abstracts else self.dtype
        self._kmin, self._kmax = (Growing((self.Hkv, self.D), adt, self.device, most) for _ in range(2))
        self._scale = Growing((self.Hkv,), torch.float32, self.device, most) if cache.int8_abstracts else None
        self.sizes: list[int] = []                        # units per chunk, in order from S
        self._log2 = Growing((1,), torch.float32, self.device, most)         # log2(units) of each chunk
        self._unit_chunk = Growing((1,), torch.long, self.device, most)      # sealed unit (from S//16) -> chunk
        self.block_rows: list[torch.Tensor] = []          # (Wq, B//16) rows of each sealed block, on the host
        self.pending = torch.zeros(0, self.B // UNIT, device=self.device)       # rows of block [W, W+B) so far
        self.all_k: torch.Tensor | None = None            # every rotated key, kept only to measure recall
        self.last_step: tuple = (None, 0, 0)   # (selection, W, n) of the last decode step

    # -- the steps attention calls (under inference mode, whoever calls) ---------------
    @torch.inference_mode()
    def prefill(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)   # a forward that failed half-way left a tail
        self.cache.begin_prefill(start)
        out = self.exact.prefill(q, k, v, rp)   # exact over the stored prefix + the chunk; stores the chunk
        self._append(start, rp.rotate(k), v)
        self._advance(start, rp.rotate(q))
        return out

    @torch.inference_mode()
    def decode(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)
        k_rot = rp.rotate(k)
        self.cache.store.write(self.layer, start, k_rot, v)
        self._append(start, k_rot, v)
        if self.layer == 0:
            self.cache.decode_tokens += k.shape[0]
        q_rot = rp.rotate(q).to(self.dtype)
        out = self._attend(q_rot)
        self._advance(start, q_rot)   # after the attention: the step's own tokens stay in the window
        return out.to(q.dtype)

    @torch.inference_mode()
    def load(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rotated keys and values (T, Hkv, D) of tokens start.. from a saved session. A session keeps no queries:
        each key stands in for its token's queries (repeated over the GQA group) when blocks are chunked."""
        if self.n > start:
            self.truncate(start)
        self.cache.store.write(self.layer, start, k, v)
        self._append(start, k, v)
        self._advance(start, k, group=self.cache.args.n_heads // self.Hkv)

    # -- growing the sequence ------------------------------------------------------------------------------
    def _append(self, start: int, k_rot: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens start.. (rotated keys, values (T, Hkv, D), already in the store) into the sink and the window."""
        kt, vt = k_rot.transpose(0, 1).to(self.dtype), v.transpose(0, 1).to(self.dtype)   # (Hkv, T, D)
        if self.cfg.measure_recall:
            self.all_k = keep_keys(self.all_k, start, kt)
        s = max(0, min(self.S - start, kt.shape[1]))   # how many go to the sink
        if s:
            self.sink_k = torch.cat([self.sink_k, kt[:, :s]], 1)
            self.sink_v = torch.cat([self.sink_v, vt[:, :s]], 1)
        self.win_k = torch.cat([self.win_k, kt[:, s:]], 1)
        self.win_v = torch.cat([self.win_v, vt[:, s:]], 1)
        self.n = start + kt.shape[1]

    def _advance(self, start: int, q_rot: torch.Tensor, group: int = 1) -> None:
        """Unit rows of the pending block from the queries q_rot (T, Hq, D) of tokens start.., then every block
        that is ready sealed (this forward's queries scoring the blocks after it too). ``group > 1``: q_rot is
        (T, Hkv, D), keys standing in for queries, each repeated over its group only where rows are taken.
        Blocks whose every scoring query is in this forward are scored and sealed together (a long prefill or a
        session load seals hundreds of blocks a forward)."""
        end, B, Wq = start + q_rot.shape[0], self.B, self.Wq
        expand = (lambda q: q.repeat_interleave(group, dim=-2)) if group > 1 else (lambda q: q)
        while True:
            first = self.W + B + self.pending.shape[0]      # the next position whose query the block needs
            a, b = max(first, start), min(end, self.W + B + Wq)
            if a < b:
                assert a == first, "unit rows must arrive in order"
                # blocks j = 0..m-1 from W, each with all Wq queries here and L tokens after it
                m = min(end - Wq - self.W, self.n - self.L - self.W) // B if not self.pending.shape[0] else 0
                if m >= 1:
                    pos = (self.W + B - start) + B * torch.arange(m)[:, None] + torch.arange(Wq)   # (m, Wq)
                    q = q_rot[pos.to(q_rot.device)]                                                # (m, Wq, H, D)
                    self._seal(unit_rows(expand(q), self.win_k[:, :m * B]))
                    continue
                rows = unit_rows(expand(q_rot[a - start:b - start]), self.win_k[:, :B])
                self.pending = torch.cat([self.pending, rows], 0)
            if self.pending.shape[0] == Wq and self.n >= self.W + B + self.L:
                self._seal(self.pending[None])
                continue
            return

    def _seal(self, rows: torch.Tensor) -> None:
        """The m blocks from W, with their unit rows (m, Wq, B//16), into chunks with abstracts; the window then
        starts at W + m B."""
        m, B, U = rows.shape[0], self.B, self.B // UNIT
        host = rows.cpu()
        if self.cfg.chunking == "fixed":
            sizes = cut_fixed(U, self.cfg.chunk_tokens // UNIT) * m
        else:
            sizes = [c for r in host for c in cut_variable(r, self.cfg.chunk_mass, self.cfg.max_chunk_tokens // UNIT)]
        lo, hi = abstracts(self.win_k[:, :m * B], sizes)
        if self._scale is not None:
            lo, hi, scale = quantize_minmax(lo, hi)
            self._scale.append(scale)
        self._kmin.append(lo)
        self._kmax.append(hi)
        counts = torch.tensor(sizes, device=self.device)
        ids = torch.arange(len(self.sizes), len(self.sizes) + len(sizes), device=self.device)
        self._unit_chunk.append(ids.repeat_interleave(counts)[None])
        self._log2.append(counts.float().log2()[None])
        self.sizes += sizes
        self.block_rows += list(host)
        self.pending = self.pending[:0]
        self.win_k, self.win_v = self.win_k[:, m * B:], self.win_v[:, m * B:]
        self.W += m * B

    # -- decode attention ----------------------------------------------------------------------------------
    def budget_units(self) -> int:
        """Units per KV head a step selects: the budget in tokens, in units, at most the sealed ones."""
        return min(-(-self.cache.budget_tokens(self.n) // UNIT), (self.W - self.S) // UNIT)

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of the newest T queries (T, Hq, D) (post-RoPE, KV dtype) over [sink | window] + selected."""
        cache = self.cache
        dense_k = torch.cat([self.sink_k, self.win_k], 1)   # (Hkv, S + n - W, D): ends with the queries' tokens
        dense_v = torch.cat([self.sink_v, self.win_v], 1)
        k, sel = self.budget_units(), None
        # Layer l+1's disk blocks of its last step start moving now, read while this layer computes (the last
        # layer prefetches layer 0's of the next step).
        after = cache.layers[(self.layer + 1) % cache.n_layers]
        cache.disk_blocks.prefetch(after.layer, after.chunks.disk_blocks)
        if k <= 0:
            out, _ = sparse_attention(q, dense_k, dense_v, causal=True)
        else:
            sel = self._select(q, k)                          # (Hkv, k) absolute unit ids, ascending
            self.buffer.reserve(k, self.W // UNIT)
            if self.buffer is cache.shared_buffer:
                self.buffer.forget_from(0)                    # another layer's chunks: nothing to reuse
            slots, dst = self.buffer.assign(sel, cache.hits)
            self.chunks.begin_step()
            self.chunks.fetch(KEYS, sel, dst, self.buffer.k, cache.moved)    # misses only (dst >= 0)
            self.chunks.fetch(VALUES, sel, dst, self.buffer.v, cache.moved)
            out, _ = sparse_attention(q, dense_k, dense_v, self.buffer.k, self.buffer.v, slots,
                                      chunk_tokens=UNIT, causal=True)
            cache.selected_units += k * self.Hkv
            chunk = self.unit_chunk[sel - self.S // UNIT]     # (Hkv, k) ascending: distinct chunks = runs
            cache.selected_chunks += int(self.Hkv + (chunk[:, 1:] != chunk[:, :-1]).sum())
            cache.selection_rows += self.Hkv
        self.last_step = (sel, self.W, self.n)   # what `covered` needs of it (`KVCache.attended`)
        if self.cfg.measure_recall:
            add_recall(self.cache.recall, q, self.all_k[:, :self.n], self.covered(sel, self.W, self.n))
        return out

    def _select(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """The k best sealed units of each KV head: each unit scores its chunk's min/max upper bound."""
        s0, n_units = self.S // UNIT, self.W // UNIT
        if k >= n_units - s0:   # every sealed unit: no scoring needed
            return torch.arange(s0, n_units, device=self.device).expand(self.Hkv, -1).contiguous()
        scale = None if self._scale is None else self._scale.view             # (Hkv, C)
        scores = chunk_scores(q, kmin=self.kmin, kmax=self.kmax, scale=scale)  # (Hkv, C) fp32, raw q·k bound
        if self.cfg.size_penalty and self.cfg.chunking == "variable":
            # bound - penalty * sqrt(D) * log2(units): the raw bound is in q·k, the penalty in softmax logits
            scores = scores - self.cfg.size_penalty * self.D ** 0.5 * self.chunk_log2[None]
        units = torch.full((self.Hkv, n_units), float("-inf"), device=self.device)
        units[:, s0:] = scores[:, self.unit_chunk]                            # (Hkv, n_units), sink at -inf
        excluded = torch.zeros(self.Hkv, n_units, dtype=torch.bool, device=self.device)
        excluded[:, :s0] = True
        return topk_ids(units, k, excluded=excluded)

    def covered(self, sel: torch.Tensor | None, W: int, n: int) -> torch.Tensor:
        """(Hkv, n) bool: the tokens a step with selection ``sel`` attends, [sink | selected | window]."""
        covered = torch.zeros(self.Hkv, n, dtype=torch.bool, device=self.device)
        covered[:, :min(self.S, n)] = True
        covered[:, W:] = True
        if sel is not None:
            tok = (sel[:, :, None] * UNIT + torch.arange(UNIT, device=self.device)).flatten(1)
            covered.scatter_(1, tok, True)
        return covered

    # -- rolling back --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def truncate(self, m: int) -> None:
        """Keep tokens 0..m-1 with the chunks a run that stopped at m would have: a sealed block stays only if
        its sealing needed no token past m; the others come back to the window from the store, their kept rows
        (queries before m) from the host."""
        if m >= self.n:
            return
        S, B = self.S, self.B
        self.cache.disk_blocks.forget_from(self.layer, m // self.cache.store.geometry.page_tokens)  # slots reused
        self.cache.store.truncate_layer(self.layer, m)
        self.chunks.invalidate()
        self.chunks.begin_step()
        keep = max(0, (m - self.L - S) // B) if m > S else 0   # blocks j with S + (j+1) B + L <= m
        # Not ``m >= W``: the last sealed block needed ``L`` tokens past it, so a cut in [W, W + L) must unseal it
        # (a run that stopped at m has it in the window, exact) even though its tokens all stay.
        if m >= self.W and S + keep * B >= self.W:         # every sealed block stays: a shorter window
            self.win_k, self.win_v = self.win_k[:, :m - self.W], self.win_v[:, :m - self.W]
            self.pending = self.pending[:max(0, m - self.W - B)]
            self.n = m
            return
        W = S + keep * B
        rows = self.block_rows[keep] if keep < len(self.block_rows) else self.pending.cpu()
        self.pending = rows[:max(0, min(self.Wq, m - W - B))].to(self.device)
        self.block_rows = self.block_rows[:keep]
        n_chunks = sum(1 for _ in self._chunks_before(W))
        self.sizes = self.sizes[:n_chunks]
        for grown in (self._log2, self._kmin, self._kmax, self._scale):
            if grown is not None:
                grown.truncate(n_chunks)
        self._unit_chunk.truncate((W - S) // UNIT)
        self.buffer.forget_from(W // UNIT)
        self.sink_k, self.sink_v = self.sink_k[:, :m], self.sink_v[:, :m]
        if m > W:
            runs = [torch.cat([r for _, r in self.chunks.token_runs(p, W, m)], 1).to(self.dtype)
                    for p in (KEYS, VALUES)]
            self.win_k, self.win_v = runs
        else:
            self.win_k, self.win_v = self.win_k[:, :0], self.win_v[:, :0]
        self.W, self.n = W, m

    def _chunks_before(self, W: int):
        a = self.S
        for c in self.sizes:
            if a >= W:
                return
            yield c
            a += c * UNIT

    def page_weight(self, page: int) -> float | None:
        """The most attention any 16-token unit of store page ``page`` drew in its block, in multiples of its even
        share (1 / units of the block) of the block's scoring queries' mass; None when the page holds tokens of
        the sink or of a block not yet sealed."""
        P, S, B = self.cache.store.geometry.page_tokens, self.S, self.B
        a, b = page * P, (page + 1) * P
        if a < S or b > self.W:
            return None
        weight = 0.0
        for block in range((a - S) // B, (b - 1 - S) // B + 1):
            imp = self.block_rows[block].double().sum(0)
            imp = imp * (B // UNIT) / imp.sum().clamp_min(1e-30)
            lo, hi = max(a, S + block * B), min(b, S + (block + 1) * B)
            u0 = (lo - S - block * B) // UNIT
            weight = max(weight, float(imp[u0:u0 + (hi - lo) // UNIT].max()))
        return weight

    def chunk_tokens(self) -> list[int]:
        """Tokens per sealed chunk, in order."""
        return [c * UNIT for c in self.sizes]

    def device_bytes(self) -> int:
        held = [self.sink_k, self.sink_v, self.win_k, self.win_v] + ([self.all_k] if self.all_k is not None else [])
        parts = (self._kmin, self._kmax, self._scale, self._log2, self._unit_chunk)
        grown = sum(g.nbytes() for g in parts if g is not None)
        own = self.buffer.device_bytes() if self.buffer is not self.cache.shared_buffer else 0
        return own + grown + sum(t.numel() * t.element_size() for t in held)

    @property
    def kmin(self) -> torch.Tensor:
        return self._kmin.view

    @property
    def kmax(self) -> torch.Tensor:
        return self._kmax.view

    @property
    def chunk_log2(self) -> torch.Tensor:
        return self._log2.view[0]

    @property
    def unit_chunk(self) -> torch.Tensor:
        return self._unit_chunk.view[0]
