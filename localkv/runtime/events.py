"""The event stream every front end consumes: the TUI, the CLI and the library all read these.

Every event has a ``text`` field (empty unless it carries reply text), so ``"".join(e.text for e in
stream)`` is the reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    text: str = ""


@dataclass
class PrefillProgress(Event):
    """Part of the prompt has been processed."""

    done: int = 0
    """Prompt tokens processed so far in this prefill."""
    total: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        rate = self.tokens_per_s
        return (self.total - self.done) / rate if rate > 0 else float("inf")


@dataclass
class TokenEvent(Event):
    """One generated token: its id(s), the text it completed (maybe empty), and running speed."""

    token_ids: list[int] = field(default_factory=list)
    n_generated: int = 0
    tokens_per_s: float = 0.0
    """Decode speed so far in this reply."""
    cache: dict[str, Any] = field(default_factory=dict)
    """The KV cache's stats after this step (tokens held, bytes per tier, bytes moved, hit rate): on the first
    token and then at most every ``engine.STATS_INTERVAL_S`` seconds, empty on the others. ``Done`` has the
    final ones."""


@dataclass
class Done(Event):
    """The reply has ended."""

    finish_reason: str = "stop"
    """``stop`` (end-of-turn token or stop string), ``length`` (max tokens or context full), ``cancelled``."""
    prompt_tokens: int = 0
    """Tokens prefilled for this reply (new tokens only: history already in the cache is not counted)."""
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0
