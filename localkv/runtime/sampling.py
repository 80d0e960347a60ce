"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax), whatever the other fields say."""

    temperature: float = 0.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least p (1.0: all)."""
    min_p: float = 0.0
    """Drop tokens less likely than ``min_p`` times the most likely one (0: none)."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens already in the context (1.0: off)."""
    seed: int | None = None


class Sampler:
    """Stateful sampler: owns the random generator so a seed gives the same tokens every run."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        """One token id from ``logits`` (vocab,) fp32; ``history`` (N,) are the ids seen so far."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            seen = torch.unique(history.to(logits.device))
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep a token if the mass strictly before it is below top_p (the first token always stays).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))
