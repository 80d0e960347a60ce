"""CUDA graphs stood in for on the CPU, so `DecodeGraphs`' own logic (when to capture, the next step prepared
ahead, what invalidates it) runs in CI. A replay runs the captured step again, over the view it was captured
with, and first checks what a real graph relies on: the cache's buffers are the ones it was captured over."""

import torch

from localkv.runtime.graphs import DecodeGraphs


class EagerGraph:
    def __init__(self, run, cache, out):
        self.run, self.cache, self.out = run, cache, out
        self.buffers = cache.buffers()

    def replay(self):
        assert self.cache.buffers() == self.buffers, "replayed over buffers it was not captured over"
        self.out.copy_(self.run())


def fake_capture(self, view):
    """`DecodeGraphs._capture` without CUDA: the warm-up run (its sums restored), then a graph whose replay
    reruns the step."""
    run = lambda: self.model.step(self.tokens, self.pos, view, decode=True)  # noqa: E731
    saved = view.save() if hasattr(view, "save") else None
    out = run().clone()
    if saved is not None:
        view.restore(saved)
    self.captures += 1
    return EagerGraph(run, self.cache, out), out


def cpu_graphs(monkeypatch, model, cache) -> DecodeGraphs:
    """A `DecodeGraphs` on the CPU, counting its `_prepare` calls (``graphs.prepared``)."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    graphs = DecodeGraphs(model, cache)
    graphs.prepared = 0
    prepare = graphs._prepare

    def counted(start):
        graphs.prepared += 1
        return prepare(start)

    graphs._prepare = counted
    return graphs
