"""Chat templates rendered as transformers renders them, errors, and end-of-turn detection."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from localkv.errors import TemplateError
from localkv.models.chat_template import DEFAULT_CHATML, ChatTemplate
from localkv.models.tokenizer import Tokenizer

pytest.importorskip("transformers")

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{% continue %}{% endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-style: strict alternation enforced with raise_exception, a namespace counter, loop controls.
MISTRAL = """{%- set ns = namespace(turn=0) %}
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if (message['role'] == 'user') != (ns.turn % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.turn = ns.turn + 1 %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

TEXTS = ["Hello!", "What is 2+2?", "  padded  ", "line one\nline two", "{{ not jinja }}", "{% raw %}",
         "naïve café 東京 😀", "quote ' and \" marks", "", "\t tabs\t", "<b>html</b> & stuff",
         "tool_call: {\"x\": 1}", "ends with newline\n"]


def random_chat(rng: random.Random, end_with_user: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": rng.choice(TEXTS)}] if rng.random() < 0.5 else []
    turns = rng.randint(1, 4)
    for i in range(turns):
        msgs.append({"role": "user", "content": " ".join(rng.choices(TEXTS, k=rng.randint(1, 3)))})
        if i < turns - 1 or not end_with_user:
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(TEXTS, k=rng.randint(1, 3)))})
    return msgs


@pytest.fixture(scope="module")
def hf_tok(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


def _ours(source, hf_tok):
    m = hf_tok.special_tokens_map
    return ChatTemplate(source, m.get("bos_token"), m.get("eos_token"), unk_token=m.get("unk_token"),
                        pad_token=m.get("pad_token"))


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen_tools", "mistral", "chatml"])
def test_random_conversations_match_transformers(hf_tok, name):
    source = {"smollm2": hf_tok.chat_template, "llama3": LLAMA3, "qwen_tools": QWEN_TOOLS, "mistral": MISTRAL,
              "chatml": DEFAULT_CHATML}[name]
    ours = _ours(source, hf_tok)
    rng = random.Random()
    for _ in range(40):
        gen = rng.random() < 0.7
        msgs = random_chat(rng, end_with_user=gen)
        extra = {}
        if name == "qwen_tools" and rng.random() < 0.6:
            extra["tools"] = [{"type": "function", "function": {"name": f"f{i}", "description": rng.choice(TEXTS),
                                                                "parameters": {"type": "object"}}}
                              for i in range(rng.randint(1, 3))]
        want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=source,
                                          **extra)
        assert ours.render(msgs, add_generation_prompt=gen, **extra) == want, json.dumps(msgs)


def test_smollm2_template_from_gguf(smollm2_tokenizer, hf_tok):
    tok = smollm2_tokenizer
    template = ChatTemplate.for_tokenizer(tok)
    msgs = [{"role": "user", "content": "Hi"}]
    assert template.render(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert template.render(msgs).endswith("<|im_start|>assistant\n")
    assert template.end_of_turn(tok) == [tok.token_id("<|im_end|>")] == [2]


def test_raise_exception_becomes_template_error():
    reason = random.choice(["roles must alternate", "bad\nmultiline  message", "Only user and assistant roles!"])
    t = ChatTemplate("{{ raise_exception(" + json.dumps(reason) + ") }}", "<s>", "</s>")
    with pytest.raises(TemplateError) as e:
        t.render([{"role": "user", "content": "x"}])
    assert str(e.value) == " ".join(reason.split())
    with pytest.raises(TemplateError, match="must alternate"):
        ChatTemplate(MISTRAL, "<s>", "</s>").render([{"role": "user", "content": "a"},
                                                     {"role": "user", "content": "b"}])


@pytest.mark.parametrize("source,when", [
    ("{% for m in messages %}{{ m.content }", "init"),       # syntax error
    ("{{ messages[0].content.no_such_method() }}", "render"),  # call of undefined
    ("{{ messages.append(1) }}", "render"),                  # sandbox: immutable
    ("{{ 1 // 0 }}", "render"),
    ("{% set ns = namespace(_x=1) %}", "render"),            # underscore attribute on namespace
])
def test_jinja_errors_are_one_line_template_errors(source, when):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError) as e:
        ChatTemplate(source).render(msgs)
    assert "\n" not in str(e.value)
    if when == "init":
        with pytest.raises(TemplateError, match="does not parse"):
            ChatTemplate(source)


def test_default_is_chatml():
    t = ChatTemplate(None)
    out = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert t.render([{"role": "user", "content": "U"}], add_generation_prompt=False).endswith("U<|im_end|>\n")


@pytest.fixture(scope="module")
def tiny_tok():
    """A byte-level BPE with the special tokens of several chat formats (ids by order below)."""
    specials = ["<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]
    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello world, the user and the assistant talk. " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return lambda bos, eos: Tokenizer(tk, bos_token=bos, eos_token=eos, add_bos=True)


@pytest.mark.parametrize("source,bos,eos,want", [
    (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|eot_id|>", "<|end_of_text|>"]),
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|eot_id|>"]),
    (MISTRAL, "<s>", "</s>", ["</s>"]),
    (None, None, "<|end_of_text|>", ["<|im_end|>", "<|end_of_text|>"]),
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", "<s>", "</s>", ["</s>"]),
])
def test_end_of_turn(tiny_tok, source, bos, eos, want):
    tok = tiny_tok(bos, eos)
    assert ChatTemplate(source, bos, eos).end_of_turn(tok) == [tok.token_id(t) for t in want]
