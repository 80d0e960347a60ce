"""One layer of the ShadowKV policy: its index, its exact dense part, and the prefill / decode / truncate steps.

A layer holding ``n`` tokens splits them at ``W`` (a chunk boundary, only ever moved by a *seal*):

    tokens 0 .. W-1   sealed: chunks with landmarks and U rows; the first ``sink`` tokens and the outlier chunks
                      are also exact in the dense buffer, the rest are selected per step and fetched
    tokens W .. n-1   the recent window: exact in the dense buffer

The dense buffer ``(Hkv, rows, D)`` is ``[sink | outliers (n_out chunks per head) | recent]``, rebuilt at each seal
and appended to by decode, so one `sparse_attention` call (dense part causal: it ends with the queries' own
tokens) plus the selected slots covers everything. A prefill chunk seals up to ``f(n) = n//C*C - local*C``
(all but the last ``local_chunks`` whole chunks and the tail); decode seals there once the window passes
``window_tokens``. ``seal_log`` remembers (length, W before) of each seal, so a truncation behind one returns
to the window in force at that length and reads its tokens back from the store.

With ``exact_keys=False`` the store holds values only. The keys a layer still has exactly are the dense buffer's
(and the low-rank basis's first block, `LowRankKeys`); every other key is rebuilt from U and SV with RoPE, as a
selected chunk's is: those of an older chunk that becomes an outlier, and those of the sealed prefix a later
prefill chunk attends to (`_held_keys`: with every chunk selected, the keys a decode step would see, so that
prefill is no longer exact past its own chunk and window). A truncation can drop only tokens of the recent window
(`check_truncate`), and nothing can be exported.
"""

from __future__ import annotations

import weakref

import torch

from ....errors import UserError
from ....kernels import lowrank_rope, sparse_attention
from ...pages import KEYS, VALUES
from ...chunks import ChunkBuffer, StoreChunks, add_recall, keep_keys
from ...streamed import StreamedAttention
from .selection import budget_chunks, select_chunks
from .index import ChunkIndex, outlier_count
from .lowrank import LowRankKeys

NO_EXACT_KEYS = "shadowkv with exact_keys=False keeps no exact keys"


class ShadowKVLayer:
    """The per-layer object attention calls (``prefill`` / ``decode``), with what truncation and sessions need."""

    def __init__(self, cache, layer: int):
        self.cache = weakref.proxy(cache)  # no cycle: the store goes with its cache
        self.layer = layer
        self.cfg = cfg = cache.config
        store = cache.store
        g = store.geometry
        self.Hkv, self.D, self.C = g.n_kv_heads, g.head_dim, cfg.chunk_tokens
        self.dtype, self.device = g.dtype, store.device
        self.exact = StreamedAttention(cache, layer)
        self.chunks = StoreChunks(store, layer, self.C)
        self.lowrank = LowRankKeys(self.Hkv, self.D, dtype=self.dtype, device=self.device, capacity=cache.capacity,
                                   read_keys=self._read_keys, rank=cfg.rank, rank_energy=cfg.rank_energy,
                                   refresh_error=cfg.refresh_error, block_tokens=cfg.block_tokens,
                                   host=cache.index_host, refresh=cfg.exact_keys)
        self.index = ChunkIndex(self.Hkv, self.D, self.C, cfg.sink_tokens // self.C, dtype=self.dtype,
                                device=self.device, capacity_chunks=-(-cache.capacity // self.C),
                                host=cache.index_host)
        self.buffer = ChunkBuffer(self.Hkv, self.C, self.D, dtype=self.dtype, device=self.device,
                                  slot_factor=cfg.slot_factor)
        self.n = 0
        self.W = 0
        self.seal_log: list[tuple[int, int]] = []
        self.sink_rows = 0        # dense rows 0..sink_rows-1: the sealed sink tokens
        self.fixed = 0            # dense rows before the recent window: sink + outliers
        self.dense_k = torch.zeros(self.Hkv, 0, self.D, dtype=self.dtype, device=self.device)
        self.dense_v = torch.zeros_like(self.dense_k)
        self.all_k: torch.Tensor | None = None  # every rotated key, kept only to measure recall
        self.last_step: tuple = (None, 0, 0)   # (selection, W, n) of the last decode step

    # -- the steps attention calls -------------------------------------------------------------------------
    # All under inference mode, whoever calls (the engine truncates outside it): the index's tensors are made
    # and changed in one mode, and an inference tensor cannot be changed in place outside inference mode.
    @torch.inference_mode()
    def prefill(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)   # a forward that failed half-way left a tail
        self.cache.begin_prefill(start)
        keys = None if self.cfg.exact_keys else self._held_keys  # the store's own keys, or the index's
        out = self.exact.prefill(q, k, v, rp, keys)   # over the stored prefix + the chunk; stores the chunk
        self._append(start, k, rp.rotate(k), v, seal=True)
        return out

    @torch.inference_mode()
    def decode(self, q, k, v, rp):
        start = rp.start
        if self.n > start:
            self.truncate(start)
        k_rot = rp.rotate(k)
        self.cache.store.write(self.layer, start, k_rot, v)
        self._append(start, k, k_rot, v, seal=False)
        if self.layer == 0:
            self.cache.decode_tokens += k.shape[0]
        return self._attend(rp.rotate(q).to(self.dtype)).to(q.dtype)

    @torch.inference_mode()
    def load(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rotated keys and values (T, Hkv, D) of tokens start.. from a saved session: stored, then indexed
        from the un-rotated keys as a prefill chunk would be."""
        if self.n > start:
            self.truncate(start)
        self.cache.store.write(self.layer, start, k, v)
        self._append(start, self.cache.tables.unrotate(k, start), k, v, seal=True)

    # -- growing the sequence ------------------------------------------------------------------------------
    def _append(self, start: int, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, seal: bool) -> None:
        """Index tokens start.. (pre-RoPE ``k``, rotated ``k_rot``, ``v``: (T, Hkv, D); already in the store)."""
        T = k.shape[0]
        self.lowrank.append(start, k)
        kt, vt = k_rot.transpose(0, 1).to(self.dtype), v.transpose(0, 1).to(self.dtype)  # (Hkv, T, D)
        if self.cfg.measure_recall:
            self.all_k = keep_keys(self.all_k, start, kt)
        self.n = start + T
        self.cache.tables.ensure(self.n)
        if seal:
            self._seal(max(self.W, self._window_start()), kt, vt)
            return
        rows = self.fixed + (start - self.W)
        self._reserve_dense(rows + T)
        self.dense_k[:, rows:rows + T] = kt
        self.dense_v[:, rows:rows + T] = vt
        if self.n - self.W > self.cfg.window_tokens:
            self._seal(self._window_start())

    def _window_start(self) -> int:
        """Where the recent window starts after a seal: the last ``local_chunks`` whole chunks and the tail."""
        return max(0, self.n // self.C * self.C - self.cfg.local_chunks * self.C)

    def _seal(self, W_new: int, kt: torch.Tensor | None = None, vt: torch.Tensor | None = None) -> None:
        """Index tokens W..W_new-1; the recent window becomes W_new..n-1. ``kt, vt (Hkv, T, D)``: the newest
        tokens when they are not in the dense buffer yet (a prefill chunk)."""
        recent = self.n - self.W - (kt.shape[1] if kt is not None else 0)
        uk = self.dense_k[:, self.fixed:self.fixed + recent]    # (Hkv, recent, D) tokens W.. (rotated)
        uv = self.dense_v[:, self.fixed:self.fixed + recent]
        if kt is not None:
            uk, uv = torch.cat([uk, kt], dim=1), torch.cat([uv, vt], dim=1)  # (Hkv, n - W, D)
        first = self.W
        if W_new > first:
            self.index.seal(uk[:, :W_new - first])
            self.seal_log.append((self.n, first))
            self.W = W_new
        self.lowrank.provisional()
        self._rebuild(uk, uv, first)

    def _rebuild(self, uk: torch.Tensor, uv: torch.Tensor, first: int) -> None:
        """Outliers chosen again for the sealed chunks, and the dense buffer rebuilt: [sink | outliers | recent].
        ``uk, uv (Hkv, n - first, D)``: the rotated keys and values of tokens first.. (first <= W)."""
        C, W = self.C, self.W
        n_out = outlier_count(W // C - self.index.sink_chunks, self.cfg.outlier_fraction, self.cfg.min_outliers)
        ids = self.index.choose_outliers(n_out)                # (Hkv, n_out)
        out_k, out_v = self._outlier_kv(ids, uk, uv, first)
        self.index.set_outliers(ids)
        sink = min(self.cfg.sink_tokens, W)
        parts_k = [self.dense_k[:, :min(sink, self.sink_rows)], uk[:, :max(0, sink - self.sink_rows)]]
        parts_v = [self.dense_v[:, :min(sink, self.sink_rows)], uv[:, :max(0, sink - self.sink_rows)]]
        assert sink <= self.sink_rows or first == self.sink_rows, "the sink's new rows must start the sealed run"
        new_k = torch.cat(parts_k + [out_k, uk[:, W - first:]], dim=1)
        new_v = torch.cat(parts_v + [out_v, uv[:, W - first:]], dim=1)
        self.sink_rows, self.fixed = sink, sink + n_out * C
        self._reserve_dense(new_k.shape[1], keep=False)
        self.dense_k[:, :new_k.shape[1]] = new_k
        self.dense_v[:, :new_v.shape[1]] = new_v

    def _outlier_kv(self, ids, uk, uv, first):
        """Exact K and V (Hkv, n_out*C, D) of the outlier chunks ``ids``: from the old outliers in the dense
        buffer, from the tokens being sealed (``uk, uv`` from position ``first``), else from the store."""
        Hkv, n_new = ids.shape
        C, D = self.C, self.D
        out_k = torch.zeros(Hkv, n_new, C * D, dtype=self.dtype, device=self.device)
        out_v = torch.zeros_like(out_k)
        if n_new == 0:
            return out_k.view(Hkv, 0, D), out_v.view(Hkv, 0, D)
        at_hand = torch.zeros(Hkv, n_new, dtype=torch.bool, device=self.device)
        old = self.index.outliers                               # (Hkv, n_old)
        if old.shape[1]:
            same = ids[:, :, None] == old[:, None, :]           # (Hkv, n_new, n_old)
            found, where = same.any(-1), same.long().argmax(-1)
            lo = self.sink_rows
            for src, dst in ((self.dense_k, out_k), (self.dense_v, out_v)):
                region = src[:, lo:lo + old.shape[1] * C].reshape(Hkv, old.shape[1], C * D)
                dst.copy_(torch.where(found[..., None], region.gather(1, where[..., None].expand(-1, -1, C * D)), dst))
            at_hand |= found
        m = (self.W - first) // C                               # chunks sealed just now, in uk
        if m:
            fresh = ids >= first // C
            j = (ids - first // C).clamp(0, m - 1)[..., None].expand(-1, -1, C * D)
            for src, dst in ((uk, out_k), (uv, out_v)):
                run = src[:, :m * C].reshape(Hkv, m, C * D)
                dst.copy_(torch.where(fresh[..., None], run.gather(1, j), dst))
            at_hand |= fresh
        slot = torch.where(at_hand, -1, torch.arange(n_new, device=self.device).expand(Hkv, n_new))
        # Older chunks that became outliers now: from the store, or their keys rebuilt as a selected chunk's are.
        self.chunks.fetch(VALUES, ids, slot, out_v.view(Hkv, n_new * C, D))
        if self.cfg.exact_keys:
            self.chunks.fetch(KEYS, ids, slot, out_k.view(Hkv, n_new * C, D))
        else:
            lr, tables = self.lowrank, self.cache.tables
            rebuilt = torch.empty_like(out_k)                   # (Hkv, n_new, C*D)
            lowrank_rope(lr.u, lr.sv, ids, tables.cos, tables.sin, rebuilt.view(Hkv, -1, D), chunk_tokens=C)
            out_k.copy_(torch.where(at_hand[..., None], out_k, rebuilt))
        return out_k.view(Hkv, n_new * C, D), out_v.view(Hkv, n_new * C, D)

    def _held_keys(self, a: int, b: int) -> torch.Tensor:
        """The rotated keys (Hkv, b-a, D) of tokens a..b-1 (``a`` a chunk start, ``b <= n``) as a decode step with
        every chunk selected sees them: exact where the dense buffer holds them (sink, outliers, recent window),
        rebuilt from U and SV with RoPE elsewhere. The prefix a prefill attends to when the store has no keys."""
        C, D, W, Hkv = self.C, self.D, self.W, self.Hkv
        m = max(0, min(b, W) - a) // C                         # sealed chunks among them, from chunk c0
        c0 = a // C
        sealed = torch.empty(Hkv, m * C, D, dtype=self.dtype, device=self.device)
        if m:
            lr, tables = self.lowrank, self.cache.tables
            ids = torch.arange(c0, c0 + m, device=self.device).expand(Hkv, m).contiguous()
            lowrank_rope(lr.u, lr.sv, ids, tables.cos, tables.sin, sealed, chunk_tokens=C)
        outliers = self.index.outliers                         # (Hkv, n_out) chunk ids, their K in dense rows
        n_out = outliers.shape[1]
        if m and n_out:                                        # slot[h, c - c0]: the outlier number of chunk c
            inside = (outliers >= c0) & (outliers < c0 + m)
            slot = torch.full((Hkv, m + 1), -1, dtype=torch.long, device=self.device)   # column m: the others
            slot.scatter_(1, torch.where(inside, outliers - c0, m),
                          torch.arange(n_out, device=self.device).expand(Hkv, -1))
            slot = slot[:, :m]
            exact = self.dense_k[:, self.sink_rows:self.sink_rows + n_out * C].reshape(Hkv, n_out, C * D)
            exact = exact.gather(1, slot.clamp(min=0)[..., None].expand(-1, -1, C * D))
            sealed = torch.where(slot[..., None] >= 0, exact, sealed.view(Hkv, m, C * D)).view(Hkv, m * C, D)
        sink = min(self.sink_rows, a + m * C) - a
        if sink > 0:
            sealed[:, :sink] = self.dense_k[:, a:a + sink]
        lo = max(a, W)                                          # the recent window's tokens among them
        recent = self.dense_k[:, self.fixed + lo - W:self.fixed + max(lo, b) - W]
        return torch.cat([sealed, recent], dim=1)

    def _reserve_dense(self, rows: int, keep: bool = True) -> None:
        if self.dense_k.shape[1] >= rows:
            return
        size = max(rows, 2 * self.dense_k.shape[1], 64)
        k = torch.zeros(self.Hkv, size, self.D, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if keep:
            used = min(self.dense_k.shape[1], self.fixed + max(0, self.n - self.W))
            k[:, :used], v[:, :used] = self.dense_k[:, :used], self.dense_v[:, :used]
        self.dense_k, self.dense_v = k, v

    # -- decode attention ----------------------------------------------------------------------------------
    def budget_tokens(self) -> int:
        return budget_chunks(self.cfg.budget, self.n, self.C) * self.C

    def step_size(self, n: int) -> tuple[int, int]:
        """(sealed chunks, chunks selected per KV head) of a decode step over ``n`` tokens."""
        n_chunks = self.W // self.C
        pool = n_chunks - min(self.index.sink_chunks, n_chunks) - self.index.outliers.shape[1]
        return n_chunks, min(budget_chunks(self.cfg.budget, n, self.C), pool)

    def _attend(self, q: torch.Tensor, n: int | None = None, dense_len: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the newest T queries (T, Hq, D) (post-RoPE, KV dtype) over dense + selected chunks.

        A graphed step (`graph`) gives the length ``n`` it runs at and ``dense_len``, the filled dense
        rows as a (1,) int32 device tensor; the eager step reads both off the host's state.
        """
        C, cache = self.C, self.cache
        graphed = dense_len is not None
        n_chunks, k = self.step_size(self.n if n is None else n)
        rows = self.dense_k.shape[1] if graphed else self.fixed + (self.n - self.W)
        dense_k, dense_v = self.dense_k[:, :rows], self.dense_v[:, :rows]
        sel = None
        if k <= 0:
            out, _ = sparse_attention(q, dense_k, dense_v, causal=True, dense_len=dense_len)
        else:
            sel = select_chunks(q, self.index.landmarks[:, :n_chunks], self.index.excluded, k)
            self.buffer.reserve(k, n_chunks)
            slots, dst = self.buffer.assign(sel, cache.hits)
            self._fill(sel, slots, dst)
            out, _ = sparse_attention(q, dense_k, dense_v, self.buffer.k, self.buffer.v, slots,
                                      chunk_tokens=C, causal=True, dense_len=dense_len)
            if not graphed:   # a replay counts on the host, after it (`ShadowKVGraphView.replayed`)
                cache.selected += k * self.Hkv
            if cache.index_host:   # read in place over PCIe: every landmark, and U's rows of the selected chunks
                elt = self.dtype.itemsize
                cache.index_reads += (n_chunks * self.D + k * C * self.lowrank.rank) * self.Hkv * elt
        self.last_step = (sel, self.W, self.n)   # what `covered` needs of it (`KVCache.attended`)
        if self.cfg.measure_recall:
            add_recall(self.cache.recall, q, self.all_k[:, :self.n], self.covered(sel, self.W, self.n))
        return out

    def _fill(self, sel: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor) -> None:
        """Values of the misses fetched into their slots (on the side stream on a GPU) while the keys of every
        selected chunk are rebuilt from U and SV with RoPE, into their slots."""
        cache, buf, lr = self.cache, self.buffer, self.lowrank
        side = cache.side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))  # selection, slots: made on the main stream
            with torch.cuda.stream(side):
                self.chunks.fetch(VALUES, sel, dst, buf.v, cache.moved)
        else:
            self.chunks.fetch(VALUES, sel, dst, buf.v, cache.moved)
        lowrank_rope(lr.u, lr.sv, sel, cache.tables.cos, cache.tables.sin, buf.k, chunk_tokens=self.C, dst=slots)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)  # the values land before the attention

    def covered(self, sel: torch.Tensor | None, W: int, n: int) -> torch.Tensor:
        """(Hkv, n) bool: the tokens a step with selection ``sel`` attends, [sink | outliers | selected | recent]."""
        C, n_chunks = self.C, W // self.C
        covered = torch.zeros(self.Hkv, n, dtype=torch.bool, device=self.device)
        covered[:, :self.sink_rows] = True
        covered[:, W:] = True
        # every chunk up to n: outliers may have been sealed since the step
        chunks = torch.zeros(self.Hkv, self.n // C + 1, dtype=torch.bool, device=self.device)
        chunks.scatter_(1, self.index.outliers, True)
        if sel is not None:
            chunks.scatter_(1, sel, True)
        covered[:, :n_chunks * C] |= chunks[:, :n_chunks].repeat_interleave(C, dim=1)
        return covered

    # -- rolling back --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep tokens 0..n-1 and the index a run that stopped at n would have."""
        if n >= self.n:
            return
        self.check_truncate(n)
        store = self.cache.store
        self.lowrank.truncate(n)                    # reads the dropped keys: before the store forgets them
        W = self.W
        while self.seal_log and self.seal_log[-1][0] > n:
            _, W = self.seal_log.pop()
        store.truncate_layer(self.layer, n)
        self.chunks.invalidate()
        if W == self.W:                             # the same window, shorter
            self.n = n
            self.lowrank.provisional()
            return
        self.index.truncate(W // self.C)
        self.buffer.forget_from(W // self.C)
        runs = [self.chunks.token_runs(p, W, n) for p in (KEYS, VALUES)]
        uk, uv = (torch.cat([r for _, r in rs], dim=1) if n > W else self.dense_k[:, :0] for rs in runs)
        self.W, self.n = W, n
        self.lowrank.provisional()
        self._rebuild(uk.to(self.dtype), uv.to(self.dtype), W)

    def check_truncate(self, n: int) -> None:
        """Raise UserError, changing nothing, when truncating to ``n`` needs exact keys the layer no longer has:
        with ``exact_keys=False`` only tokens of the recent window can be dropped (their exact keys are in the
        dense buffer); a cut behind a seal would have to bring sealed tokens back into the window exactly."""
        if self.cfg.exact_keys or n >= self.n or not self.seal_log or self.seal_log[-1][0] <= n:
            return
        raise UserError(f"{NO_EXACT_KEYS}: it cannot go back to {n:,} tokens, behind its recent window (which "
                        f"starts at {self.W:,}); use exact_keys=True to edit or roll back that far")

    def _read_keys(self, a: int, b: int):
        """Pre-RoPE keys of tokens a..b-1 as (first position, (t, Hkv*D) fp32) runs, from the store; with
        ``exact_keys=False`` from the recent window, the only ones held exactly (`check_truncate` asks no more)."""
        if self.cfg.exact_keys:
            runs = self.chunks.token_runs(KEYS, a, b)          # (Hkv, t, D) rotated
        elif a >= self.W:
            runs = [(a, self.dense_k[:, self.fixed + a - self.W:self.fixed + b - self.W])]
        else:
            raise UserError(f"{NO_EXACT_KEYS}: the keys of tokens {a:,}..{b - 1:,} are gone")
        for pos, k in runs:
            yield pos, self.cache.tables.unrotate(k.transpose(0, 1), pos).reshape(k.shape[1], -1)

    def device_bytes(self) -> int:
        held = [self.dense_k, self.dense_v] + ([self.all_k] if self.all_k is not None else [])
        return (self.lowrank.device_bytes() + self.index.device_bytes() + self.buffer.device_bytes()
                + sum(t.numel() * t.element_size() for t in held))

    def host_bytes(self) -> int:
        """Bytes of the index in pinned CPU memory (U and landmarks, when the GPU has no room for them)."""
        return self.lowrank.host_bytes() + self.index.host_bytes()
