"""The engine: a model, its tokenizer and a KV policy, turning token ids into an event stream.

Generation is layered (STYLE.md item 4): ``prefill`` and ``decode_one`` are separate functions so each can be
compiled or graphed on its own; ``generate`` is the token generator that yields events; blocking calls in
``localkv.api`` are built on it.

A ``Sequence`` is a KV cache plus the ids whose KV it holds. A new request names the full token list it
wants to continue from; ``Sequence.sync`` keeps the longest common prefix and prefills only what differs,
so a chat turn appends to the conversation's KV instead of recomputing it, and a cancelled or edited reply
is rolled back with ``truncate``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ContextOverflowError
from ..models import calibration
from ..models.loader import LoadedModel
from ..offload import KVCache, make_cache, policies
from .detok import IncrementalDetokenizer, StopMatcher
from .events import Done, Event, PrefillProgress, TokenEvent
from .graphs import DecodeGraphs
from .sampling import Sampler, SamplingParams


STATS_INTERVAL_S = 0.25
"""Least time between two token events that carry the cache's stats: reading them walks every layer on the
host (about 0.45 ms for a sparse policy's 32 layers, measured on one core of the 2-core development machine),
time the GPU would wait for each token."""


@dataclass
class GenerationParams:
    """What to generate: how many tokens, how to sample them, where to stop."""

    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    """Strings that end the reply (not included in it)."""
    stop_ids: list[int] | None = None
    """Token ids that end the reply; None means the model's end-of-turn and eos ids."""


class Sequence:
    """A KV cache and the token ids whose KV it holds."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.ids: list[int] = []
        self.graphs: DecodeGraphs | None = None
        """The sequence's graphed decode steps, made at its first decode where the cache allows them."""

    def __len__(self) -> int:
        return len(self.ids)

    def sync(self, target: list[int]) -> list[int]:
        """Keep the longest common prefix of the cached ids and ``target``; return the ids still to run."""
        n = 0
        limit = min(len(self.ids), len(target))
        while n < limit and self.ids[n] == target[n]:
            n += 1
        if n == len(target) and n > 0:
            n -= 1  # the last token must run again: its logits choose the next token
        if n < len(self.ids):
            self.cache.truncate(n)
            del self.ids[n:]
        return target[n:]


class Engine:
    """Runs one loaded model under one KV policy."""

    def __init__(self, loaded: LoadedModel, *, ctx_tokens: int, policy: str = policies.DEFAULT,
                 prefill_chunk: int | None = None, budgets=None, kv_dtype: torch.dtype | None = None,
                 cuda_graphs: bool = True, **policy_options):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.ctx_tokens = ctx_tokens
        self.policy = policy
        self.budgets = budgets
        """Tier budgets (``localkv.offload.store.Budgets``), or None to keep the KV whole on the device."""
        self.kv_dtype = kv_dtype or self.model.dtype
        self.policy_options = {**calibration.options(loaded.source, policy), **policy_options}
        """The policy's options: what the user gave over what ``localkv eval --calibrate`` fitted to the model."""
        self.cuda_graphs = cuda_graphs
        """Decode through CUDA graphs where the cache allows it (``localkv.runtime.graphs``)."""
        on_gpu = self.model.device.type == "cuda"
        self.prefill_chunk = prefill_chunk or (4096 if on_gpu else 512)

    def new_sequence(self) -> Sequence:
        return Sequence(make_cache(self.policy, self.loaded.args, self.ctx_tokens, device=self.model.device,
                                   dtype=self.kv_dtype, budgets=self.budgets, **self.policy_options))

    # -- prompt rendering --------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation under the model's chat template (ChatML-like fallback without one)."""
        template = self.loaded.template
        if template is None:
            from ..models.chat_template import ChatTemplate

            template = ChatTemplate(None, self.tokenizer.bos_token, self.tokenizer.eos_token)  # ChatML
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of plain text, with BOS when the tokenizer adds one."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    # -- the two compute steps ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        """Run a chunk of prompt ids; returns the logits of its last token (vocab,)."""
        tokens = torch.tensor(ids, dtype=torch.long, device=self.model.device)
        logits = self.model(tokens, seq.cache)
        seq.ids.extend(ids)
        return logits[-1]

    @torch.inference_mode()
    def decode_one(self, seq: Sequence, token: int) -> torch.Tensor:
        """Run one generated token; returns the logits for the next (vocab,)."""
        if seq.graphs is None and self.cuda_graphs and DecodeGraphs.supported(self.model, seq.cache):
            seq.graphs = DecodeGraphs(self.model, seq.cache)
        logits = seq.graphs(token) if seq.graphs is not None else None
        if logits is None:
            tokens = torch.tensor([token], dtype=torch.long, device=self.model.device)
            logits = self.model(tokens, seq.cache, decode=True)[-1]
        seq.ids.append(token)
        return logits

    # -- the token generator -----------------------------------------------------------------------------
    def check_fits(self, seq: Sequence, target: list[int]) -> None:
        if len(target) + 1 > self.ctx_tokens:
            raise ContextOverflowError(
                f"the prompt is {len(target):,} tokens, more than the context of {self.ctx_tokens:,} "
                f"tokens leaves room for (raise --ctx, or shorten the input)")

    def generate(self, seq: Sequence, target: list[int], params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """Continue ``seq`` from the token list ``target``: prefill what is new, then decode.

        Yields PrefillProgress events, a TokenEvent per generated token, and a final Done.
        """
        self.check_fits(seq, target)
        todo = seq.sync(target)
        stop_ids = set(self.loaded.stop_ids if params.stop_ids is None else params.stop_ids)
        sampler = Sampler(params.sampling)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)

        # Prefill in chunks so progress shows and a long prompt never needs all its activations at once.
        t0 = time.perf_counter()
        logits = None
        for i in range(0, len(todo), self.prefill_chunk):
            logits = self.prefill(seq, todo[i:i + self.prefill_chunk])
            yield PrefillProgress(done=min(i + self.prefill_chunk, len(todo)), total=len(todo),
                                  elapsed_s=time.perf_counter() - t0)
            if cancel is not None and cancel.is_set():
                yield Done(finish_reason="cancelled", prompt_tokens=i, prefill_s=time.perf_counter() - t0)
                return
        prefill_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        stats_at = None   # when the cache's stats were last read (they cost a host pass over every layer)
        history = torch.tensor(seq.ids, dtype=torch.long)
        generated: list[int] = []
        finish = "length"
        while len(generated) < params.max_tokens:
            token = sampler(logits, history if params.sampling.repetition_penalty != 1.0 else None)
            if token in stop_ids:
                finish = "stop"
                break
            generated.append(token)
            if params.sampling.repetition_penalty != 1.0:
                history = torch.cat([history, torch.tensor([token])])
            text = stops.push(detok.push(token))
            now = time.perf_counter()
            stats = {}
            if stats_at is None or now - stats_at >= STATS_INTERVAL_S:
                stats, stats_at = seq.cache.stats(), now
            elapsed = now - t1
            yield TokenEvent(text=text, token_ids=[token], n_generated=len(generated),
                             tokens_per_s=len(generated) / elapsed if elapsed > 0 else 0.0, cache=stats)
            if stops.stopped:
                finish = "stop"
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if len(generated) >= params.max_tokens or len(seq) + 1 > self.ctx_tokens:
                break
            logits = self.decode_one(seq, token)
        tail = ""
        if not stops.stopped:  # text held back for a possible stop string or an unfinished character
            tail = stops.push(detok.flush())
            tail += stops.flush()
        if tail:
            yield TokenEvent(text=tail, n_generated=len(generated))
        yield Done(finish_reason=finish, prompt_tokens=len(todo), generated_tokens=len(generated),
                   prefill_s=prefill_s, decode_s=time.perf_counter() - t1, cache=seq.cache.stats())
