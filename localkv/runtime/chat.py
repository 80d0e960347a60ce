"""A multi-turn chat: messages plus the sequence whose KV holds them, appended turn by turn."""

from __future__ import annotations

import threading
from typing import Iterator

from .engine import Engine, GenerationParams
from .events import Done, Event


class ChatSession:
    """A conversation with one model. ``send`` streams the reply; the KV of earlier turns is reused."""

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.seq = engine.new_sequence()
        self.last: Done | None = None
        """The Done event of the last reply (speeds, token counts)."""

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation held in the KV cache."""
        return len(self.seq)

    def send(self, text: str, params: GenerationParams | None = None,
             cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the assistant's reply.

        The reply is recorded in ``messages`` even when it is cut short (cancel, error, or the consumer
        stopping early), so the conversation and its KV stay consistent.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            target = self.engine.render(self.messages, add_generation_prompt=True)
            self.engine.check_fits(self.seq, target)
        except Exception:
            self.messages.pop()
            raise
        parts: list[str] = []
        started = False
        try:
            for event in self.engine.generate(self.seq, target, params or GenerationParams(), cancel):
                started = True
                if isinstance(event, Done):
                    self.last = event
                parts.append(event.text)
                yield event
        except BaseException:
            if not started:
                self.messages.pop()
                raise
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            raise
        else:
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and its KV); keep the system prompt unless a new one is given."""
        if system is None and self.messages and self.messages[0]["role"] == "system":
            system = self.messages[0]["content"]
        self.messages = [{"role": "system", "content": system}] if system else []
        self.seq = self.engine.new_sequence()
