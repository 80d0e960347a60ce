"""The library face of localkv: ``load`` a model, then ``generate``, ``stream`` or ``chat``.

    >>> import localkv
    >>> llm = localkv.load()                      # the embedded SmolLM2-135M-Instruct
    >>> llm.generate("What is the capital of France?", max_tokens=24)
    'The capital of France is Paris.'
    >>> chat = llm.chat()
    >>> for event in chat.send("Tell me more"):
    ...     print(event.text, end="")
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch

from .models.loader import LoadedModel, load_model
from .runtime import ChatSession, Done, Engine, Event, GenerationParams, SamplingParams
from .units import parse_tokens

Prompt = str | list[dict]


class LLM:
    """A loaded model with its KV policy. Create it with ``localkv.load``."""

    def __init__(self, loaded: LoadedModel, engine: Engine):
        self.loaded = loaded
        self.engine = engine

    @property
    def args(self):
        """The model's ``ModelArgs``."""
        return self.loaded.args

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def ctx_tokens(self) -> int:
        return self.engine.ctx_tokens

    def _params(self, max_tokens, temperature, seed, top_k, top_p, min_p, repetition_penalty, stop
                ) -> GenerationParams:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        return GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=list(stop or []))

    def _target(self, prompt: Prompt, raw: bool) -> list[int]:
        if isinstance(prompt, str):
            if raw:
                return self.engine.encode_raw(prompt)
            prompt = [{"role": "user", "content": prompt}]
        return self.engine.render(list(prompt), add_generation_prompt=True)

    def stream(self, prompt: Prompt, *, max_tokens: int = 512, temperature: float = 0.0,
               seed: int | None = None, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, stop: list[str] | None = None, raw: bool = False,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream the reply to one prompt as events (each has ``.text``; the last is a ``Done``).

        Args:
            prompt: a user message (the chat template is applied), or a list of
                ``{"role": ..., "content": ...}`` messages.
            max_tokens: most tokens to generate.
            temperature: 0 for greedy decoding.
            seed: makes sampling repeatable.
            top_k, top_p, min_p, repetition_penalty: sampling filters (off by default).
            stop: strings that end the reply.
            raw: send a string prompt as is, without the chat template.
            cancel: set it from another thread to stop generating.
        """
        params = self._params(max_tokens, temperature, seed, top_k, top_p, min_p, repetition_penalty, stop)
        seq = self.engine.new_sequence()
        yield from self.engine.generate(seq, self._target(prompt, raw), params, cancel)

    def generate(self, prompt: Prompt, *, max_tokens: int = 512, temperature: float = 0.0,
                 seed: int | None = None, **options) -> str:
        """The reply to one prompt, as a string. Takes the same options as ``stream``."""
        return "".join(e.text for e in self.stream(prompt, max_tokens=max_tokens, temperature=temperature,
                                                   seed=seed, **options))

    def chat(self, system: str | None = None) -> "Chat":
        """A multi-turn conversation whose KV carries over from turn to turn."""
        return Chat(self, ChatSession(self.engine, system))


class Chat:
    """A conversation: ``send`` streams a reply, ``messages`` holds the turns so far."""

    def __init__(self, llm: LLM, session: ChatSession):
        self.llm = llm
        self.session = session

    @property
    def messages(self) -> list[dict]:
        return self.session.messages

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation in the KV cache."""
        return self.session.context_tokens

    @property
    def last(self) -> Done | None:
        """The final event of the last reply: token counts and speeds."""
        return self.session.last

    def send(self, text: str, *, max_tokens: int = 512, temperature: float = 0.0, seed: int | None = None,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop: list[str] | None = None, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add a user message and stream the reply's events."""
        params = self.llm._params(max_tokens, temperature, seed, top_k, top_p, min_p, repetition_penalty, stop)
        return self.session.send(text, params, cancel)

    def reset(self, system: str | None = None) -> None:
        """Start over (keeps the system prompt unless a new one is given)."""
        self.session.reset(system)


def load(model: str | Path | None = None, *, ctx: str | int = "8K", policy: str = "exact",
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LLM:
    """Load a model for generation.

    Args:
        model: an embedded model name (default ``smollm2-135m``, fetched on first use), a GGUF file, or a
            Hugging Face model directory (config.json + safetensors + tokenizer.json).
        ctx: context size in tokens: ``8192``, ``"8K"``, ``"128K"``, ``"1M"``.
        policy: which KV policy attends (``"exact"``).
        device: ``"cuda"``, ``"cpu"``...; the GPU when there is one.
        dtype: weights and activations dtype; bf16 on a GPU, fp32 on a CPU by default.

    Returns:
        An ``LLM``.
    """
    ctx_tokens = parse_tokens(ctx)
    loaded = load_model(model, device=device, dtype=dtype)
    return LLM(loaded, Engine(loaded, ctx_tokens=ctx_tokens, policy=policy))
