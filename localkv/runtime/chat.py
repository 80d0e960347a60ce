"""A multi-turn chat: messages plus the sequence whose KV holds them, appended turn by turn."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

from .engine import Engine, GenerationParams
from .events import Done, Event, PrefillProgress, TokenEvent

CHECKPOINT_S = 60.0
"""A session that saves itself (``autosave``) saves the KV of a long prefill this often: a prefill interrupted
(a crash, Ctrl-C, a full disk) resumes from its last checkpoint instead of from the start."""


class ChatSession:
    """A conversation with one model. ``send`` streams the reply; the KV of earlier turns is reused.

    With ``autosave`` set to a directory the session saves itself there after every reply and every
    `CHECKPOINT_S` of a prefill (`offload.session`: each save appends only the new pages)."""

    def __init__(self, engine: Engine, system: str | None = None, autosave: Path | None = None):
        self.engine = engine
        self.autosave = Path(autosave).expanduser() if autosave is not None else None
        self.pending: str | None = None
        """A user message whose prefill a checkpoint caught (resumed sessions): send it again to continue."""
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
        saved_at = time.perf_counter()
        try:
            for event in self.engine.generate(self.seq, target, params or GenerationParams(), cancel):
                if (isinstance(event, PrefillProgress) and self.autosave is not None and event.done < event.total
                        and time.perf_counter() - saved_at >= CHECKPOINT_S):
                    # the generator waits at this event: the cache holds exactly seq.ids
                    self.save(self.autosave, messages=self.messages[:-1], pending=text)
                    saved_at = time.perf_counter()
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
            self._autosave()
            raise
        else:
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            self._autosave()

    def _autosave(self) -> None:
        if self.autosave is not None:
            self.save(self.autosave)
            self.pending = None

    def save(self, path, messages: list[dict] | None = None, pending: str | None = None) -> None:
        """Write the conversation and its KV to the directory ``path`` (atomically; see offload.session);
        ``pending``: a user message whose prefill the KV holds only part of (a checkpoint)."""
        from ..offload import session

        loaded = self.engine.loaded
        extra = {"policy": self.engine.policy, "ctx_tokens": self.engine.ctx_tokens}
        if pending is not None:
            extra["pending"] = pending
        session.save(path, self.seq.cache, self.seq.ids, self.messages if messages is None else messages,
                     model=session.fingerprint(loaded.args, loaded.source), extra=extra)

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
        chat.pending = manifest.get("pending")
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
