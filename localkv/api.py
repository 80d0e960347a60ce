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
        self.plan = None
        """What lives where (``localkv.offload.planner.Plan``), set by ``load``."""
        self.resume_session: str | Path | None = None

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
        """A multi-turn conversation whose KV carries over from turn to turn.

        After ``load(..., session=PATH)`` the first call returns the conversation saved there, resumed (or a new
        one when PATH holds none yet), and it saves itself there after every reply and during long prefills.
        """
        if self.resume_session is not None:
            path, self.resume_session = Path(self.resume_session).expanduser(), None
            if (path / "manifest.json").exists():
                chat = self.load_session(path)
                chat.session.autosave = path
                return chat
            return Chat(self, ChatSession(self.engine, system, autosave=path))
        return Chat(self, ChatSession(self.engine, system))

    def load_session(self, path: str | Path) -> "Chat":
        """Resume a conversation saved with ``Chat.save``; its KV is read back, not recomputed."""
        return Chat(self, ChatSession.resume(self.engine, path))


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

    def save(self, path: str | Path) -> None:
        """Save the conversation and its KV to a directory; resume with ``localkv.load(..., session=path)``."""
        self.session.save(path)


def load(model: str | Path | None = None, *, ctx: str | int = "8K", policy: str | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         gpu_mem: str | int | None = None, cpu_mem: str | int | None = None, disk: str | Path | None = None,
         kv_dtype: str | torch.dtype | None = None, session: str | Path | None = None,
         policy_options: dict | None = None) -> LLM:
    """Load a model for generation.

    Args:
        model: an embedded model name (default ``smollm2-135m``, fetched on first use), a GGUF file, or a
            Hugging Face model directory (config.json + safetensors + tokenizer.json).
        ctx: context size in tokens: ``8192``, ``"8K"``, ``"128K"``, ``"1M"``.
        policy: which KV policy attends (default ``"exact"``; ``localkv.policies()`` lists them).
        device: ``"cuda"``, ``"cpu"``...; the GPU when there is one.
        dtype: weights and activations dtype; bf16 on a GPU, fp32 on a CPU by default.
        gpu_mem, cpu_mem: KV budget of the GPU and pinned-CPU tiers (``"2GB"``, ``"512MB"``, or bytes);
            by default what the machine has free, with headroom.
        disk: a directory for the disk tier; by default ``$LOCALKV_HOME/kv``, used only when the context
            does not fit in GPU and CPU memory.
        kv_dtype: dtype the KV is stored in (default: ``dtype``).
        session: a chat session's directory: the conversation saved there (``Chat.save``) is resumed by the first
            ``chat()``, its KV read back, not recomputed; a directory that holds none starts one. Either way the
            chat saves itself there after every reply, and every minute of a long prefill, so an interrupted
            prefill resumes from what it had done.
        policy_options: the policy's options (``localkv policies`` lists each policy's, e.g. ``{"budget": 1/16}``);
            the planner counts them where they change what the KV takes.

    Returns:
        An ``LLM``; ``llm.plan`` says what lives where.
    """
    from .models.hub import home
    from .models.loader import parse_dtype
    from .offload.disk import check_writable
    from .offload.planner import make_plan
    from .offload.store import Budgets
    from .units import parse_bytes

    from .offload import policies

    policy = policy or policies.DEFAULT
    policies.get(policy).parse(policy_options)   # an unknown policy or a bad option fails before any loading
    ctx_tokens = parse_tokens(ctx)
    gpu_bytes = parse_bytes(gpu_mem) if gpu_mem is not None else None
    cpu_bytes = parse_bytes(cpu_mem) if cpu_mem is not None else None
    if disk is not None:
        disk = Path(disk).expanduser()
        check_writable(disk)  # before any work
    loaded = load_model(model, device=device, dtype=dtype)
    kv = parse_dtype(kv_dtype) if isinstance(kv_dtype, str) else (kv_dtype or loaded.model.dtype)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    plan = make_plan(loaded.args, ctx_tokens, model=loaded.source.name, policy=policy, device=loaded.model.device,
                     kv_dtype=kv, weights_bytes=weights, gpu_mem=gpu_bytes, cpu_mem=cpu_bytes, disk=disk,
                     default_disk=home() / "kv", options=policy_options)
    budgets = None
    if plan.tiered or kv != loaded.model.dtype:
        budgets = Budgets(plan.gpu.budget, plan.cpu.budget, Path(plan.disk_dir) if plan.disk_dir else None,
                          plan.disk.budget or None)
    options = {**plan.policy_options, **(policy_options or {})}   # what the planner decided, unless told
    engine = Engine(loaded, ctx_tokens=ctx_tokens, policy=policy, budgets=budgets, kv_dtype=kv, **options)
    llm = LLM(loaded, engine)
    llm.plan = plan
    if session is not None:
        from .offload.disk import check_writable
        from .offload.session import read_manifest

        path = Path(session).expanduser()
        if (path / "manifest.json").exists() or (path.is_dir() and any(path.iterdir())):
            read_manifest(path)   # a damaged session, or a directory that is not one, fails now
        else:
            check_writable(path, "--session")  # where a new session will be saved
        llm.resume_session = path
    return llm
