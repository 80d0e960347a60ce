"""A multi-turn chat: messages plus the sequence whose KV holds them, appended turn by turn."""

from __future__ import annotations

import threading
from typing import Iterator

from .engine import Engine, GenerationParams
from .events import Done, Event, TokenEvent


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
        replied = False  # a token was generated: from then on the reply is kept, whatever happens
        try:
            for event in self.engine.generate(self.seq, target, params or GenerationParams(), cancel):
                if isinstance(event, Done):
                    self.last = event
                    replied = True
                elif isinstance(event, TokenEvent):
                    replied = True
                parts.append(event.text)
                yield event
        except BaseException:
            # An error in the prefill (a full disk, say) drops the turn; the KV keeps only whole chunks and
            # the next turn resynchronises with it.
            if not replied:
                self.messages.pop()
                raise
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            raise
        else:
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def save(self, path) -> None:
        """Write the conversation and its KV to the directory ``path`` (atomically; see offload.session)."""
        from ..offload import session

        loaded = self.engine.loaded
        session.save(path, self.seq.cache, self.seq.ids, self.messages,
                     model=session.fingerprint(loaded.args, loaded.source),
                     extra={"policy": self.engine.policy, "ctx_tokens": self.engine.ctx_tokens})

    @classmethod
    def resume(cls, engine: Engine, path) -> "ChatSession":
        """A session saved with ``save``, its KV read back instead of recomputed."""
        import torch

        from ..errors import ContextOverflowError, UserError
        from ..offload import session

        manifest = session.read_manifest(path)
        loaded = engine.loaded
        expected = session.fingerprint(loaded.args, loaded.source)
        if manifest["model"] != expected:
            raise UserError(f"the session in {path} was saved with {manifest['model'].get('source')}, "
                            f"not {loaded.source.name}")
        n = manifest["tokens"]
        if n + 1 > engine.ctx_tokens:
            raise ContextOverflowError(f"the session in {path} holds {n:,} tokens, more than --ctx "
                                       f"{engine.ctx_tokens:,} leaves room for")
        chat = cls(engine)
        chat.messages = manifest["messages"]
        cache = chat.seq.cache
        args = loaded.args
        dtype = getattr(torch, manifest["kv_dtype"]) if manifest["kv_dtype"] else engine.kv_dtype
        start = cache.reserve(n)
        for layer, pages in session.load_pages(path, manifest, (args.n_layers, args.n_kv_heads, args.head_dim),
                                               dtype):
            cache.import_pages(layer, pages.to(engine.model.device, engine.kv_dtype), n)
        cache.commit(n - start)
        chat.seq.ids = list(manifest["ids"])
        return chat

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (and its KV); keep the system prompt unless a new one is given."""
        if system is None and self.messages and self.messages[0]["role"] == "system":
            system = self.messages[0]["content"]
        self.messages = [{"role": "system", "content": system}] if system else []
        self.seq = self.engine.new_sequence()
