"""localkv: chat with a local LLM over a context far larger than GPU memory.

The library API: ``localkv.load(...)`` returns an ``LLM`` with ``generate``, ``stream`` and ``chat``.
"""

__version__ = "0.1.0"

from .api import LLM, Chat, load
from .errors import ContextOverflowError, ModelFormatError, TemplateError, UserError

__all__ = ["LLM", "Chat", "ContextOverflowError", "ModelFormatError", "TemplateError", "UserError", "load",
           "__version__"]
