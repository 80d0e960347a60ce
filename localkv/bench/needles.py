"""Needles in synthesized KV: chunks whose keys the decode query aligns with, and whether a policy attended them.

Random KV gives a sparse policy nothing to find. `Needles` plants, in every layer and KV head, ``N`` runs of
16 tokens (the smallest chunk any policy cuts) whose keys line up with the query of one known decode step, spread
over the context so that some live on each tier the plan fills (disk included). After the timed steps the bench
decodes that step eagerly and asks the cache which tokens it attended (`KVCache.attended`); ``needle_recall`` is
the share of (layer, KV head, needle) whose 16 tokens were all attended. Exact policies attend to everything: 1.0.

The query is found without the context. A needle's value is zero, and its logit is far above the background's
for every query head, so in the real step every layer's attention output is close to zero (the softmax mass sits
on zero values). A probe forward whose attention returns exactly zero therefore sees the same hidden states,
hence the same pre-RoPE queries, layer by layer. That holds only if *every* head of a GQA group puts its mass on
the needles (one head attending elsewhere makes its layer's output, and every later layer's queries, differ from
the probe's), so the needle key of KV head h points along the sum of its group's unit queries,
``u = Σ_g q_g / |q_g|`` (random heads are nearly orthogonal, so each ``q_g · u`` is about ``|q_g|``), scaled to
``alpha`` and rotated to the probe step's position. ``alpha`` puts the smallest of the group's scores at 45
logits once scaled by 1/sqrt(D) and the key's norm at 40 or more, far above the min/max bound of a 16-token chunk
of random keys (about 1.4 sqrt(D) |q|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..offload.kv import KVCache

UNIT = 16
"""Tokens per needle."""
MIN_CONTEXT = 4096
"""Shorter contexts get no needles: their budgets cover most of the context anyway."""


class _ZeroAttention:
    """A stand-in cache for the probe: each layer records its queries and returns zero attention."""

    def __init__(self, n_layers: int):
        self.queries: list[torch.Tensor | None] = [None] * n_layers
        self._layers = [_ZeroLayer(self, i) for i in range(n_layers)]

    def reserve(self, n: int) -> int:
        return 0

    def commit(self, n: int) -> None:
        pass

    def layer(self, i: int):
        return self._layers[i]


class _ZeroLayer:
    def __init__(self, probe: _ZeroAttention, i: int):
        self.probe, self.i = probe, i

    def decode(self, q, k, v, rp):
        self.probe.queries[self.i] = q[-1].float()   # (Hq, D), before RoPE
        return torch.zeros_like(q)

    prefill = decode


@dataclass
class Needles:
    """Where the needles are and their keys; `plant` writes them into a fill, `recall` measures after a step."""

    token: int
    """The token the measured step feeds."""
    position: int
    """Its position: the cache's length when it runs."""
    starts: list[int]
    """First token of each needle (multiples of 16)."""
    keys: torch.Tensor
    """(n_layers, Hkv, D) rotated needle key of each layer and KV head."""

    @classmethod
    @torch.inference_mode()
    def make(cls, model, ctx: int, position: int, n: int = 8, seed: int = 0) -> "Needles | None":
        """``n`` needles over a ``ctx``-token context, aligned with the query of a step at ``position`` (None below
        `MIN_CONTEXT`). They sit at evenly spaced 16-token boundaries, clear of the first and last 1,024 tokens
        (sinks and recent windows, which every policy keeps)."""
        if ctx < MIN_CONTEXT:
            return None
        args = model.args
        token = int(torch.randint(0, args.vocab_size, (1,), generator=torch.Generator().manual_seed(seed)))
        probe = _ZeroAttention(args.n_layers)
        model(torch.tensor([token], device=model.device), probe, decode=True)
        q = torch.stack(probe.queries)                                    # (L, Hq, D) pre-RoPE
        G = args.n_heads // args.n_kv_heads
        groups = q.view(args.n_layers, args.n_kv_heads, G, args.head_dim)    # (L, Hkv, G, D)
        unit = groups / groups.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        u = unit.sum(2)
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)               # (L, Hkv, D): the group's direction
        least = (groups * u[:, :, None]).sum(-1).amin(-1, keepdim=True)    # the group's smallest q_g · u
        alpha = torch.clamp(45 * math.sqrt(args.head_dim) / least.clamp_min(1e-3), min=40.0)
        pre = alpha * u                                                   # |key| = alpha
        rp = model.rope.positions(torch.tensor([position], device=model.device), torch.float32, position)
        keys = torch.stack([rp.rotate(pre[layer][None])[0] for layer in range(args.n_layers)])
        span = (ctx - 2048) // UNIT
        starts = [1024 + UNIT * ((2 * j + 1) * span // (2 * n)) for j in range(n)]
        return cls(token, position, starts, keys.to(model.dtype))

    def plant(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start..`` of a fill (k, v: (T, Hkv, D)) with the needles in them: copies when any falls inside."""
        T = k.shape[0]
        inside = [s for s in self.starts if s < start + T and s + UNIT > start]
        if not inside:
            return k, v
        k, v = k.clone(), v.clone()
        for s in inside:
            a, b = max(s, start) - start, min(s + UNIT, start + T) - start
            k[a:b] = self.keys[layer].to(k.dtype)
            v[a:b] = 0
        return k, v

    @torch.inference_mode()
    def recall(self, model, cache: KVCache) -> float:
        """Decode the needles' step eagerly on ``cache`` (which must be ``position`` tokens long) and return the
        share of (layer, KV head, needle) whose tokens the step attended."""
        if cache.length != self.position:
            raise ValueError(f"the needles' step runs at {self.position}, the cache holds {cache.length} tokens")
        model(torch.tensor([self.token], device=model.device), cache, decode=True)
        tokens = torch.tensor([s + i for s in self.starts for i in range(UNIT)], device=model.device)
        hit = total = 0
        for layer in range(model.args.n_layers):
            seen = cache.attended(layer)
            n = len(self.starts) * model.args.n_kv_heads
            total += n
            if seen is None:
                hit += n
                continue
            got = seen[:, tokens].view(seen.shape[0], len(self.starts), UNIT).all(-1)   # (Hkv, N)
            hit += int(got.sum())
        return hit / total
