"""CUDA graphs of the one-token decode step: the whole forward replayed with one launch.

An eager decode step of an 8B model launches some 700 kernels, each with little to do at batch 1, so the
CPU's launch rate, not the GPU, sets the pace (23 ms a token against a 5.3 ms weight-streaming floor on an
H100). A graph records the step once and replays it. Everything that changes from step to step is a device
tensor the replay reads: the token, its position (RoPE tables and the KV write index) and the filled length
of the KV (the attention kernel's bound). Buffers must stay where they were recorded, so the KV is seen
through fixed row counts: one graph per bucket, rows rounded up to a step of 1K rows or 1/16 to 1/8 of the
length, whichever is larger, so attention is laid out over few rows more than are filled (and skips those).

Graphs serve caches that offer ``static_view`` (a policy's choice; a cache without it decodes eagerly). A view
serves one bucket of rows, or every length with one graph while the cache's ``buffers`` signature holds; it may
run host bookkeeping after each replay (``replayed``) and save the state its warm-up run adds (``save`` /
``restore``).

Deciding whether the next step can replay, and with which graph, is host work (about 0.34 ms for a sparse policy
over 32 layers, measured on one core of the 2-core development machine). It is done for step t+1 right after
step t's replay is launched, while the GPU runs it; `KVCache.epoch` says whether anything touched the cache in
between.
"""

from __future__ import annotations

import torch

_MIN_ROWS = 1024


def bucket_rows(n: int, capacity: int) -> int:
    """Rows of the graph that serves a KV of ``n`` tokens: ``n`` rounded up to a coarse step, at most
    ``capacity``."""
    step = max(_MIN_ROWS, 1 << max(0, n.bit_length() - 4))
    return min(capacity, -(-n // step) * step)


class DecodeGraphs:
    """The graphed decode steps of one sequence, captured lazily, one per bucket of KV rows."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        device = model.device
        self.tokens = torch.zeros(1, dtype=torch.long, device=device)   # the replay's inputs
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # rows -> (graph, logits)
        self.pool = torch.cuda.graph_pool_handle()   # one memory pool: the graphs never run at once
        self.buffers: tuple[int, ...] = ()
        self.captures = 0
        self._ahead: tuple[tuple[int, int], tuple] | None = None   # ((start, epoch), _prepare(start))

    @staticmethod
    def supported(model, cache) -> bool:
        """Whether this model and cache can decode through graphs."""
        return (model.device.type == "cuda" and hasattr(cache, "static_view")
                and model.rope.kind != "dynamic")  # dynamic NTK reads the longest position back each step

    def __call__(self, token: int) -> torch.Tensor | None:
        """Decode ``token`` at the cache's next position; its logits (vocab,), or None when this cache
        cannot be graphed yet (the caller runs the step eagerly)."""
        cache = self.cache
        start = cache.reserve(1)
        ahead, self._ahead = self._ahead, None
        view, key, buffers = (ahead[1] if ahead is not None and ahead[0] == (start, cache.epoch)
                              else self._prepare(start))
        if view is None:
            return None
        if buffers != self.buffers:   # the KV grew into new buffers: every graph points at the old
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()  # a pool is not reused once its graphs are gone
            self.buffers = buffers
        self.tokens.fill_(token)
        self.pos.fill_(start)
        self.length.fill_(start + 1)
        if key not in self.graphs:
            self.graphs[key] = self._capture(view)
        graph, logits = self.graphs[key]
        graph.replay()
        if hasattr(view, "replayed"):      # host state the replay cannot advance
            view.replayed()
        cache.commit(1)
        out = logits[-1].clone()           # the next replay overwrites the static output
        if start + 1 < cache.capacity:
            # The next step's host work, while the GPU runs this one. Good while nothing else reserves or
            # truncates in between (`KVCache.epoch`; the next call's own reserve adds one).
            try:
                self._ahead = ((start + 1, cache.epoch + 1), self._prepare(start + 1))
            except Exception:  # noqa: BLE001 - this token is done; the next call prepares again and raises there
                self._ahead = None
        return out

    def _prepare(self, start: int) -> tuple[object, object, tuple]:
        """(view of the step decoding the token at ``start``, or None if it cannot be graphed; the key of its
        graph; the cache's buffer signature). Host work, and the growth of the buffers the step needs, which
        is ordered on the stream after any step still running."""
        rows = bucket_rows(start + 1, self.cache.capacity)
        view = self.cache.static_view(rows, self.length)
        if view is None:
            return None, None, ()
        return view, getattr(view, "key", rows), self.cache.buffers()   # a view may serve every length with one graph

    def _capture(self, view) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        run = lambda: self.model.step(self.tokens, self.pos, view, decode=True)  # noqa: E731
        # Warm up on a side stream (Triton compiles and autotunes here, not under capture). Each run writes this
        # step's K/V at its position, which the replay writes again with the same values.
        saved = view.save() if hasattr(view, "save") else None   # sums the warm-up run would add twice
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        if saved is not None:
            view.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.captures += 1
        return graph, logits
