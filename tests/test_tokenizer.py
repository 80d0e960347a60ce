"""The tokenizer against transformers' on fresh random text: GGUF byte-level BPE, SentencePiece, tokenizer.json."""

from __future__ import annotations

import json
import random
import unicodedata

import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors, trainers

from localkv.errors import ModelFormatError
from localkv.models.gguf import read_gguf_metadata
from localkv.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ["hello", "World", "the", "don't", "I'm", "they'll", "WE'RE", "naïve", "café", "Straße", "İstanbul",
         "日本語", "東京", "한국어", "Россия", "مرحبا", "😀", "👍🏽", "🇺🇸", "👨‍👩‍👧", "ﬁ", "e\u0301", "\u200b",
         "def", "foo(x):", "return", "x**2", "{\"a\": 1}", "<b>", "</div>", "http://a.b/c?d=e", "$", "#", "...",
         "!!!", "'s", "''", "--", "3.14", "1,000", "2024", "0x1F", "<", "|", ">", "<|", "|>", "im_start"]
SPACES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u3000", "\xa0", "    \n"]


def random_text(rng: random.Random, specials: list[str], digits: bool = True) -> str:
    parts = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if r < 0.45:
            parts.append(rng.choice(WORDS))
        elif r < 0.65:
            parts.append(rng.choice(SPACES))
        elif r < 0.75 and specials:
            parts.append(rng.choice(specials))
        elif r < 0.85:
            parts.append("".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 7))))
        else:
            lo, hi = rng.choice([(0x21, 0x7E), (0xA0, 0x2FFF), (0x1F300, 0x1FAFF), (0x4E00, 0x9FFF)])
            parts.append(chr(rng.randint(lo, hi)))
    text = "".join(parts)
    # Without digits means without any Unicode number (\p{N}: "1", "²", "ⅾ"): that is what the pre-tokenizers split.
    return text if digits else "".join(c for c in text if not unicodedata.category(c).startswith("N"))


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer, hf_smollm2_tokenizer):
    """(ours, transformers' tokenizer, transformers' backend with SmolLM2's original pre-tokenizer)."""
    ours = smollm2_tokenizer
    hf = hf_smollm2_tokenizer
    # transformers gives GGUF pre-tokenizer "smollm" GPT-2's plain ByteLevel split. SmolLM2's own tokenizer.json
    # (and llama.cpp's "smollm") first splits digits one by one, which differs after whitespace: "a  1" is
    # [a, ĠĠ, 1] there and [a, Ġ, Ġ, 1] in transformers. We follow the model's tokenizer.json.
    fixed = Backend.from_str(hf.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ours, hf, fixed


def test_smollm2_attributes(smol):
    ours, hf, _ = smol
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos) == (1, 2, False)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.chat_template == hf.chat_template
    assert ours.token_id("<|im_end|>") == 2 and ours.token_id("no such token") is None
    assert ours.is_special(2) and ours.is_special(0) and not ours.is_special(ours.encode("hello")[0])
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == set(hf.all_special_ids) | {
        i for i, t in hf.added_tokens_decoder.items() if t.special}


def test_smollm2_random_text_matches_transformers(smol):
    ours, hf, fixed = smol
    rng = random.Random()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
    for _ in range(400):
        text = random_text(rng, specials)
        ids = ours.encode(text)
        assert ids == fixed.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.encode(text, add_special_tokens=True) == ids  # SmolLM2 adds no BOS
        assert ours.decode(ids) == hf.decode(ids) == text, repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_smollm2_without_digits_matches_transformers_unpatched(smol):
    ours, hf, _ = smol
    rng = random.Random()
    for _ in range(200):
        text = random_text(rng, ["<|im_start|>", "<|im_end|>"], digits=False)
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)


def test_special_tokens_in_text_become_ids(smol):
    ours, _, _ = smol
    ids = ours.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids and ours.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n"
    assert ours.decode(ids, skip_special_tokens=True) == "user\nHi\n"


# -- GGUF tokenizers built from tiny vocabularies ------------------------------------------------------------

CORPUS = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. don't they'll "
          "Héllo wörld, naïve café, 東京 日本語, emoji 🙂🚀. 0123456789 12 345 the then there their them ") * 20


def _write_tokenizer_gguf(path, md_writer):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny tokenizer")
    md_writer(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _compare_with_transformers(tmp_path, name, specials, digits=True, n=250):
    ours = Tokenizer.from_gguf(read_gguf_metadata(tmp_path / name))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
    rng = random.Random()
    for _ in range(n):
        text = random_text(rng, specials, digits)
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), (repr(text), add)
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (repr(text), skip)
    return ours, hf


@pytest.mark.parametrize("pre", ["qwen2", "default", "llama-bpe", "smollm"])
def test_byte_level_pre_tokenizers(tmp_path, pre):
    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    j = json.loads(tk.to_str())
    tokens = [t for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]

    def write(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(pre == "llama-bpe")

    _write_tokenizer_gguf(tmp_path / "t.gguf", write)
    # transformers splits "smollm" like GPT-2 (no digit split; see the fixture `smol`): compare on digit-free text.
    ours, _ = _compare_with_transformers(tmp_path, "t.gguf", specials, digits=pre != "smollm")
    assert ours.add_bos == (pre == "llama-bpe")


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_gguf(tmp_path, prefix):
    """A SentencePiece (tokenizer.ggml.model "llama") vocabulary with byte fallback, as Llama 2 / Mistral ship."""
    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=random.randint(200, 400), show_progress=False))
    pieces = [t for t, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(prefix)

    _write_tokenizer_gguf(tmp_path / "sp.gguf", write)
    assert (ours := Tokenizer.from_gguf(read_gguf_metadata(tmp_path / "sp.gguf"))).add_bos
    assert ours.bos_token == "<s>" and ours.eos_token_id == 2
    if prefix:
        _compare_with_transformers(tmp_path, "sp.gguf", ["<s>", "</s>", "<unk>"])
    else:
        # transformers ignores tokenizer.ggml.add_space_prefix = false; llama.cpp honours it, and so do we.
        rng = random.Random()
        for _ in range(100):
            text = random_text(rng, [])
            ids = ours.encode(text)
            assert not ours.id_to_token(ids[0]).startswith("▁") if ids and text[:1] != " " else True
            assert ours.decode(ids) == text, repr(text)


def test_unsupported_gguf_tokenizer():
    with pytest.raises(ModelFormatError, match="'bert'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelFormatError, match="tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})


# -- tokenizer.json + tokenizer_config.json ------------------------------------------------------------------


def test_from_files_matches_transformers(tmp_path):
    from tiny import write_tokenizer

    write_tokenizer(tmp_path, vocab_size=random.randint(280, 400))
    ours = Tokenizer.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.eos_token == "<|im_end|>" and ours.bos_token is None and not ours.add_bos
    assert ours.chat_template == hf.chat_template
    rng = random.Random()
    for _ in range(200):
        text = random_text(rng, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(ids) == hf.decode(ids) and ours.decode(ids, True) == hf.decode(ids, skip_special_tokens=True)


def test_from_files_bos(tmp_path):
    from tiny import write_tokenizer

    write_tokenizer(tmp_path)
    tk = Backend.from_file(str(tmp_path / "tokenizer.json"))
    bos = tk.token_to_id("<|endoftext|>")
    # A Llama 3 style tokenizer.json: the post-processor prepends BOS and the config has no add_bos_token.
    tk.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                      special_tokens=[("<|endoftext|>", bos)])
    tk.save(str(tmp_path / "tokenizer.json"))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config["bos_token"] = {"content": "<|endoftext|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(template)
    ours = Tokenizer.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert ours.add_bos and ours.bos_token_id == bos and ours.chat_template == template
    assert ours.encode("hi", add_special_tokens=True) == [bos] + ours.encode("hi")
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not Tokenizer.from_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json").add_bos
    with pytest.raises(ModelFormatError):
        Tokenizer.from_files(tmp_path / "missing.json")
