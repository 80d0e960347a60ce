"""The tokenizer: a `tokenizers.Tokenizer` from ``tokenizer.json`` or rebuilt from GGUF metadata.

A GGUF file carries no ``tokenizer.json``: it lists the vocabulary (``tokenizer.ggml.tokens``), the BPE
merges or SentencePiece scores, a type per token (1 normal, 2 unknown, 3 control, 4 user-defined,
6 byte) and the name of the pre-tokenizer llama.cpp uses (``tokenizer.ggml.pre``). We rebuild the
same tokenizer Hugging Face transformers builds from those, with the split regex llama.cpp runs for
that name (``llama.cpp/src/llama-vocab.cpp``), which is the one of the model's original
``tokenizer.json``.

BOS/EOS are added here, not by the backend's post-processor, so that `encode` behaves the same
whatever the source: ``encode(text)`` gives the text's tokens only, ``encode(text, True)`` adds BOS
when the model wants it (`add_bos`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from ..errors import ModelFormatError

UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regex, or None for GPT-2's built into ByteLevel; digits split one by one
# first; BPE ignore_merges: a pre-token that is itself in the vocabulary is taken whole, as Llama 3 does).
# Names not listed get GPT-2's split, as in transformers.
_PRE: dict[str, tuple[str | None, bool, bool]] = {
    **{name: (None, False, False) for name in ("default", "gpt2", "mpt", "olmo", "jais")},
    **{name: (None, True, False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                             "exaone", "minerva")},
    **{name: (_LLAMA3_SPLIT, False, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                                      "pixtral", "dbrx", "smaug-bpe")},
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    "tekken": (_TEKKEN_SPLIT, False, False),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE tokens are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces, best score first.

    Same order as transformers' ``generate_merges`` (score, then left and right length, descending).
    """
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _token_content(value: Any) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (tokenizer_config.json spells special tokens both ways)."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Attributes:
        bos_token, eos_token: the strings of the BOS / EOS tokens (None when the model has none).
        bos_token_id, eos_token_id: their ids.
        add_bos: whether ``encode(text, add_special_tokens=True)`` prepends BOS.
        add_eos: whether it appends EOS.
        vocab_size: ids in the vocabulary, added tokens included.
        chat_template: the model's Jinja chat template, or None.
    """

    def __init__(self, backend: _Backend, *, bos_token: str | None, eos_token: str | None, add_bos: bool,
                 add_eos: bool = False, chat_template: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.add_bos = bool(add_bos) and self.bos_token_id is not None
        self.add_eos = bool(add_eos) and self.eos_token_id is not None
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, tokenizer_json: str | os.PathLike,
                   tokenizer_config_json: str | os.PathLike | None = None) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json`` and (optionally) its ``tokenizer_config.json``.

        A ``chat_template.jinja`` next to either file is used when the config has no template.
        """
        tokenizer_json = Path(tokenizer_json)
        try:
            backend = _Backend.from_file(str(tokenizer_json))
        except Exception as exc:
            raise ModelFormatError(f"{tokenizer_json}: cannot read tokenizer ({str(exc).splitlines()[0]})") from None
        config: dict[str, Any] = {}
        if tokenizer_config_json is not None:
            try:
                config = json.loads(Path(tokenizer_config_json).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelFormatError(f"{tokenizer_config_json}: cannot read ({exc})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None:
            dirs = {tokenizer_json.parent} | ({Path(tokenizer_config_json).parent} if tokenizer_config_json else set())
            for d in dirs:
                if (d / "chat_template.jinja").is_file():
                    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: whatever tokenizer.json's post-processor does (Llama 3 prepends <|begin_of_text|>).
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            add_bos = len(with_special) > len(plain) and bos is not None \
                and with_special[0] == backend.token_to_id(bos)
        return cls(backend, bos_token=bos, eos_token=eos, add_bos=add_bos,
                   add_eos=bool(config.get("add_eos_token", False)), chat_template=template)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes, from its metadata (as returned by ``load_gguf``).

        Supports ``tokenizer.ggml.model`` ``gpt2`` (byte-level BPE) and ``llama`` (SentencePiece BPE).
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError("GGUF metadata has no tokenizer (tokenizer.ggml.tokens is missing)")
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend, add_bos_default = _byte_level_bpe(tokens, types, metadata)
        elif kind == "llama":
            backend, add_bos_default = _sentencepiece_bpe(tokens, types, metadata), True
        else:
            raise ModelFormatError(f"GGUF tokenizer model {kind!r} is not supported (localkv builds: gpt2, llama)")

        def special(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(backend, bos_token=special("bos"), eos_token=special("eos"),
                   add_bos=metadata.get("tokenizer.ggml.add_bos_token", add_bos_default),
                   add_eos=metadata.get("tokenizer.ggml.add_eos_token", False),
                   chat_template=metadata.get("tokenizer.chat_template"))

    # -- use ----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) become their ids.

        Args:
            text: the text.
            add_special_tokens: add BOS (and EOS) as the model's tokenizer config asks (`add_bos`).
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos else []) + ids + ([self.eos_token_id] if self.add_eos else [])
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless ``skip_special_tokens``."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary (``"<|im_end|>"``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of ``token_id``, or None."""
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token such as BOS, EOS or ``<|im_end|>``."""
        return token_id in self._special

    def __len__(self) -> int:
        return self.vocab_size


def _byte_level_bpe(tokens: list[str], types: list[int], md: dict[str, Any]) -> tuple[_Backend, bool]:
    pre = md.get("tokenizer.ggml.pre", "default")
    split, digits, ignore_merges = _PRE.get(pre, _PRE["default"])
    alphabet = set(_bytes_to_unicode().values())
    spell = _bytes_to_unicode()
    # Tokens are stored in the byte alphabet, except (in some files) added tokens written as plain
    # UTF-8; respell those so that the vocabulary is consistent, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    backend = _Backend(models.BPE(vocab, merges, dropout=None, fuse_unk=False, byte_fallback=False,
                                  ignore_merges=ignore_merges))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a converter mislabel; transformers skips it.
    _add_special(backend, tokens, types, md, lambda t: set(t) <= alphabet)
    # llama.cpp adds BOS for the Llama 3 family when the file does not say.
    return backend, split == _LLAMA3_SPLIT


def _sentencepiece_bpe(tokens: list[str], types: list[int], md: dict[str, Any]) -> _Backend:
    scores = md.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelFormatError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = md.get("tokenizer.ggml.merges")
    merges = ([tuple(m.split(" ", 1)) for m in merges] if merges
              else _generate_merges(vocab, dict(zip(tokens, scores))))
    backend = _Backend(models.BPE(vocab, merges, dropout=None, fuse_unk=True, byte_fallback=True))
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special(backend, tokens, types, md, lambda t: True)
    return backend


def _add_special(backend: _Backend, tokens: list[str], types: list[int], md: dict[str, Any], ok) -> None:
    """Control and unknown tokens, and those the metadata names BOS/EOS/UNK/PAD, become special added tokens
    (llama.cpp's special-token cache; transformers' special tokens map); user-defined ones become plain added
    tokens (matched whole in the text)."""
    named = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    control = [AddedToken(t, special=True, normalized=False) for i, (t, k) in enumerate(zip(tokens, types))
               if (k in (CONTROL, UNKNOWN) or i in named) and ok(t)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)
