"""Chat templates: a model's own Jinja template rendered the way Hugging Face transformers renders it.

Same environment as ``transformers.utils.chat_template_utils``: an ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not escape HTML, and the globals ``raise_exception`` and ``strftime_now``. The template sees
``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the special tokens (``bos_token``,
``eos_token``, ...) and any extra keyword arguments. ``{% generation %}`` blocks (transformers'
assistant-mask tag) render their body.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError

# transformers' former default: ChatML, for models that ship no template.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SENTINEL = "LOCALKV_SENTINEL_7f3a"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _RaisedByTemplate(Exception):
    """What ``raise_exception`` raises inside the sandbox, so its message is kept verbatim."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (transformers uses it for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict()`` for templates without the attribute surface of the real type (as transformers does)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (a sandbox escape route), as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env.from_string(source)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only (the template must not reach methods of caller objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to.

    Args:
        source: the Jinja source (``tokenizer.chat_template``); None uses ChatML (`DEFAULT_CHATML`).
        bos_token, eos_token: the strings the template sees as ``bos_token`` / ``eos_token``.
        **special_tokens: more names the template may use (``unk_token``, ``pad_token``).
    """

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None,
                 **special_tokens: str | None):
        self.source = source if source is not None else DEFAULT_CHATML
        self.special_tokens = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token,
                                                     **special_tokens).items() if v is not None}
        try:
            self._template = _compile(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not parse (line {exc.lineno}): {_one_line(exc)}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The tokenizer's own template, or ChatML when it has none."""
        return cls(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render a conversation to the prompt text.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]``.
            add_generation_prompt: end with the header that opens the assistant's turn.
            **extra: more template variables (``tools``, ``documents``, ``enable_thinking``, a special token
                override...).

        Raises:
            TemplateError: the template called ``raise_exception`` or failed to render.
        """
        chat = []
        for message in _plain(list(messages)):
            if not isinstance(message, dict):
                raise TemplateError(f"chat messages must be dicts, got {message!r}")
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = {"tools": None, "documents": None, **self.special_tokens, **_plain(extra)}
        try:
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except _RaisedByTemplate as exc:
            raise TemplateError(_one_line(exc)) from None
        except Exception as exc:  # jinja2 errors, and TypeError/KeyError/... from inside the template
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None

    def end_of_turn(self, tokenizer) -> list[int]:
        """Token ids that end an assistant turn under this template, the template's own first.

        Renders ``[user, assistant]`` with a sentinel as the assistant's content and takes the first
        special token the template writes after it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). The
        tokenizer's EOS follows when it is a different token; if the template writes no special token
        after the reply, only EOS is returned.
        """
        ids: list[int] = []
        try:
            text = self.render([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
        except TemplateError:
            text = ""
        if _SENTINEL in text:
            after = text[text.index(_SENTINEL) + len(_SENTINEL):]
            first = next((i for i in tokenizer.encode(after) if tokenizer.is_special(i)), None)
            if first is not None:
                ids.append(first)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids
