"""Generation: engine (prefill + decode loop), sampling, detokenization, events, chat sessions."""

from .chat import ChatSession
from .engine import Engine, GenerationParams, Sequence
from .events import Done, Event, PrefillProgress, TokenEvent
from .sampling import Sampler, SamplingParams

__all__ = ["ChatSession", "Done", "Engine", "Event", "GenerationParams", "PrefillProgress", "Sampler",
           "SamplingParams", "Sequence", "TokenEvent"]
