"""The ShadowKV decode step as a CUDA graph replays it (``localkv.runtime.graphs``).

An eager ShadowKV step launches about 130 kernels a layer, 4,000 for an 8B model; at 128K it took 140 ms a token
for 15 ms of GPU work. Every piece of the step already lives on the device with a static shape, given a few host
values per layer: where the recent window starts (W), the dense rows before it (fixed), the sealed chunks, the
selection size k, and the addresses of the buffers. A graph stays valid while those stay the same.
`signature` lists them, and the engine captures again when it changes: at a seal of the window, a refresh of
the basis, a new k, a new page arena. That happens every few hundred tokens.

A step is *plain* when the host has nothing to do in it: no page of the store fills, no block of the low-rank
basis ends, the window does not overflow, no page of the layer is on disk, nothing is truncated, recall is
not measured, and the index is on the GPU (a host index is written by the host). Other steps run eagerly
(`graph_view` returns None), and the next plain one replays.

A replay does what the eager step does on the device. It writes the token's K/V into the open page (its V
alone with ``exact_keys=False``: the key goes to a scratch page, ``ShadowKV.scratch_keys``) and the
dense buffer at positions read from device tensors and parks its pre-RoPE key for the next eager step to
project (its U row and Gram sums: `LowRankKeys.flush`), all in one launch with the RoPE of q and k
(`kernels.rope_append`); then it selects, reuses or fetches chunks, rebuilds keys and
attends. The host's counts (tokens, rows, chunks selected) are advanced after the replay
(`ShadowKVGraphView.replayed`). Capture runs the step once eagerly first, to compile the kernels; the
counters that run would add twice are saved and restored around it (`save` / `restore`). Its chunks
stay in the slot buffer, so the replay that follows a capture finds them all there: the hit rate counts that
one step as all hits, one step in a few hundred.
"""

from __future__ import annotations

import torch

from ....kernels import rope_append
from ...pages import KEYS, VALUES


def _plain(lay, start: int) -> bool:
    """Whether layer ``lay`` can decode token ``start`` with no host work, readying its buffers if so."""
    cfg, lr, store = lay.cfg, lay.lowrank, lay.cache.store
    n = start + 1
    if lay.n != start or cfg.measure_recall or lr.basis is None or lr.rows != start:
        return False
    if n % lr.block == 0 or n % store.geometry.page_tokens == 0 or store.tokens[lay.layer] != start:
        return False                                  # a block of the basis ends, or the open page fills
    if n - lay.W > cfg.window_tokens:
        return False                                  # the window seals
    n_chunks, k = lay.step_size(n)
    if k <= 0:
        return False
    lay.chunks._table()
    if lay.chunks.has_disk[VALUES]:
        return False                                  # values on disk are read by the host
    lay._reserve_dense(lay.fixed + cfg.window_tokens)  # room for the whole window: no growth until a seal
    lay.buffer.reserve(k, n_chunks)
    lr._ensure_rows(min(n + lr.block, lr.capacity))   # rows ahead: U grows at an eager step, not each step
    return True


def plain_step(cache) -> bool:
    """Whether the next decode step of ``cache`` is plain (its buffers readied for it if so)."""
    return all(_plain(lay, cache.length) for lay in cache.layers)


def graph_view(cache, length: torch.Tensor) -> "ShadowKVGraphView | None":
    """The view a graphed step runs over, for the next token of ``cache`` on a GPU; None when that step is not
    plain. ``length (1,) int32`` holds the length after the step, refilled by the caller before each replay."""
    if cache.side is None or cache.index_host or not plain_step(cache):
        return None                 # a host index is written by the host (the step runs eagerly)
    return ShadowKVGraphView(cache, cache.length, length)


def signature(cache) -> tuple:
    """Everything a captured step has baked in, per layer: host values and buffer addresses."""
    n = cache.length + 1
    sig = [cache.tables.cos.data_ptr(), cache.tables.sin.data_ptr()]
    for lay in cache.layers:
        lr, ix = lay.lowrank, lay.index
        sig.append((lay.W, lay.fixed, lay.step_size(n), lay.dense_k.data_ptr(), lay.dense_v.data_ptr(),
                    lr.u.data_ptr(), lr.basis.data_ptr(), lr.sv.data_ptr(), ix.landmarks.data_ptr(),
                    ix.excluded.data_ptr(), lay.buffer.buffers(), lay.chunks.signature()))
    return tuple(sig)


class _GraphedLayer:
    """One layer's decode inside the graph (`ShadowKVLayer.decode` with device positions)."""

    def __init__(self, lay, view: "ShadowKVGraphView"):
        self.lay, self.view = lay, view

    def decode(self, q, k, v, rp):
        lay, view = self.lay, self.view
        if lay.layer == 0:
            view.begin(rp.pos)
        store = lay.cache.store
        g = store.geometry
        open_page = store.open[lay.layer]                            # (parts, Hkv, P, D)
        page_k = open_page[KEYS] if g.parts == 2 else lay.cache.scratch_keys  # values only: the key goes nowhere
        row, dense_len = view.dense_rows(lay.fixed - lay.W)
        park = (lay.lowrank.parking(), view.block_row(lay.lowrank.block))
        # One launch: RoPE on q and k; K/V into the open page and the dense buffer; the pre-RoPE key parked.
        q = rope_append(q, k, v, rp.cos, rp.sin, [(page_k, open_page[g.part_index(VALUES)], view.page_offset),
                                                   (lay.dense_k, lay.dense_v, row)], park)
        return lay._attend(q.to(lay.dtype), view.start + 1, dense_len=dense_len).to(q.dtype)

    prefill = decode


class ShadowKVGraphView:
    """The cache as a graphed decode step of token ``start`` sees it."""

    def __init__(self, cache, start: int, length: torch.Tensor):
        self.cache, self.start, self.length = cache, start, length
        self.layers = [_GraphedLayer(lay, self) for lay in cache.layers]
        self.key = 0   # one graph per signature, whatever the length
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, i: int) -> _GraphedLayer:
        return self.layers[i]

    def begin(self, pos: torch.Tensor) -> None:
        """Per-run device values, made inside the run (a capture must record them, not reuse an earlier run's)."""
        self.pos = pos
        self.page_offset = pos % self.cache.store.geometry.page_tokens
        self._rows.clear()

    def block_row(self, block: int) -> torch.Tensor:
        """The token's row in a block of ``block`` tokens, (1,) int64 (where `LowRankKeys.parking` holds its key)."""
        key = ("block", block)
        if key not in self._rows:
            self._rows[key] = self.pos % block
        return self._rows[key]

    def dense_rows(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense row of the token (1,) int64, filled dense rows (1,) int32) for a layer whose dense buffer
        starts ``shift = fixed - W`` rows before its position; shared by the layers with the same shift."""
        if shift not in self._rows:
            self._rows[shift] = (self.pos + shift, self.length + shift)
        return self._rows[shift]

    # -- around capture and replay ---------------------------------------------------------------------
    def save(self):
        """The counters an eager run of the step adds to (the parked key it writes is written again)."""
        return self.cache.hits.clone(), self.cache.moved.clone()

    def restore(self, saved) -> None:
        hits, moved = saved
        self.cache.hits.copy_(hits)
        self.cache.moved.copy_(moved)

    def replayed(self) -> None:
        """Advance the host's state past the replayed token."""
        c, n = self.cache, self.start + 1
        for lay in c.layers:
            lay.n = n
            lay.lowrank.advance(1)
            c.store.tokens[lay.layer] = n
            c.selected += lay.step_size(n)[1] * lay.Hkv
        c.decode_tokens += 1
