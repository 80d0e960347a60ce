"""Sampling, incremental detokenization, stop strings, chat sessions: the runtime on a tiny model."""

import threading

import pytest
import torch

import localkv
from localkv.errors import ContextOverflowError
from localkv.runtime import Done, PrefillProgress, TokenEvent
from localkv.runtime.detok import IncrementalDetokenizer, StopMatcher
from localkv.runtime.sampling import Sampler, SamplingParams
from tiny import write_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("tiny") / "qwen", "qwen2")
    return localkv.load(path, ctx="2K", device="cpu", dtype="fp32")


def test_greedy_is_argmax():
    logits = torch.randn(500)
    assert Sampler(SamplingParams())(logits) == int(logits.argmax())


def test_seed_repeats_and_filters_hold():
    logits = torch.randn(200) * 3
    draw = lambda **kw: [Sampler(SamplingParams(temperature=1.0, seed=7, **kw))(logits) for _ in range(1)][0]  # noqa: E731
    assert draw() == draw()
    top5 = set(torch.topk(logits, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5))
    assert {s(logits) for _ in range(200)} <= top5
    probs = torch.softmax(logits, -1)
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.5))
    assert all(probs[s(logits)] >= 0.5 * probs.max() for _ in range(100))
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[:int((torch.cumsum(probs[order], 0) < 0.5).sum()) + 1].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5))
    assert {s(logits) for _ in range(200)} <= nucleus


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(10)
    logits[3], logits[4] = 2.0, 1.9
    s = Sampler(SamplingParams(repetition_penalty=1.5))
    assert s(logits, torch.tensor([3])) == 4


def test_detokenizer_never_splits_utf8(llm):
    text = "naïve café 東京 🙂🚀 " * 3
    ids = llm.tokenizer.encode(text)
    d = IncrementalDetokenizer(llm.tokenizer)
    parts = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(parts) == llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in parts)


def test_stop_strings_hold_back_and_cut():
    m = StopMatcher(["STOP", "\n\n"])
    out = "".join(m.push(t) for t in ["Hello S", "TO", "P world"])
    assert out == "Hello " and m.stopped
    m = StopMatcher(["STOP"])
    assert m.push("ST") == "" and m.push("AR") == "STAR" and m.flush() == ""


def test_stream_events_and_max_tokens(llm):
    events = list(llm.stream("hello there", max_tokens=7))
    assert isinstance(events[0], PrefillProgress) and isinstance(events[-1], Done)
    tokens = [e for e in events if isinstance(e, TokenEvent) and e.token_ids]
    done = events[-1]
    assert done.generated_tokens == len(tokens) <= 7
    assert done.finish_reason in ("stop", "length")
    assert "".join(e.text for e in events) == llm.generate("hello there", max_tokens=7)


def test_token_events_carry_stats_at_most_every_interval(llm, monkeypatch):
    """Reading the cache's stats walks every layer on the host: the first token has them, then only tokens a
    full interval later; Done has the final ones."""
    from localkv.runtime import engine

    def run():
        seq = llm.engine.new_sequence()
        params = engine.GenerationParams(max_tokens=6, stop_ids=[])   # no end of turn: six tokens
        events = list(llm.engine.generate(seq, llm.engine.encode_raw("hello there"), params))
        return events, [e for e in events if isinstance(e, TokenEvent) and e.token_ids]

    monkeypatch.setattr(engine, "STATS_INTERVAL_S", 3600.0)
    events, tokens = run()
    assert len(tokens) == 6 and tokens[0].cache["tokens"] > 0 and not any(t.cache for t in tokens[1:])
    assert events[-1].cache["tokens"] == tokens[0].cache["tokens"] + 5
    monkeypatch.setattr(engine, "STATS_INTERVAL_S", 0.0)
    assert all(t.cache for t in run()[1])


def test_chat_appends_turns_to_the_kv(llm):
    chat = llm.chat(system="You are terse.")
    first = list(chat.send("The quick brown fox", max_tokens=12))
    n1 = chat.context_tokens
    second = list(chat.send("jumps over the lazy dog", max_tokens=12))
    assert second[-1].prompt_tokens < n1  # only the new turn (and the template's glue) was prefilled
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == "".join(e.text for e in first)
    # The KV after two turns equals a fresh prefill of the same conversation.
    target = llm.engine.render(chat.messages[:4], add_generation_prompt=True)
    assert chat.session.seq.ids[:len(target)] == target


def test_cancel_keeps_partial_reply(llm):
    chat = llm.chat()
    cancel = threading.Event()
    events = []
    for e in chat.send("Count please", max_tokens=50, cancel=cancel):
        events.append(e)
        if isinstance(e, TokenEvent) and e.n_generated == 3:
            cancel.set()
    assert events[-1].finish_reason == "cancelled" and events[-1].generated_tokens == 3
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.messages[-1]["content"] == "".join(e.text for e in events)
    list(chat.send("again", max_tokens=3))  # the conversation goes on
    assert len(chat.messages) == 4


def test_prompt_longer_than_context_is_refused(llm):
    small = localkv.LLM(llm.loaded, type(llm.engine)(llm.loaded, ctx_tokens=16))
    with pytest.raises(ContextOverflowError, match="context of 16"):
        small.generate("word " * 40, max_tokens=2)
    chat = small.chat()
    with pytest.raises(ContextOverflowError):
        list(chat.send("word " * 40))
    assert chat.messages == []
