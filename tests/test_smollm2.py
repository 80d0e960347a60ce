"""The embedded SmolLM2-135M (GGUF) against Hugging Face transformers loading the same file."""

import pytest
import torch

import localkv
from localkv.offload import make_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return localkv.load(smollm2_gguf, ctx="8K", device="cpu", dtype="fp32")


def _prompt_ids(llm, n: int) -> list[int]:
    words = ("the of and to in is was for on that with as by at from his her they which model cache "
             "memory long context tokens attention paris france river city history music science").split()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    text = " ".join(words[i] for i in torch.randint(len(words), (3 * n,), generator=g).tolist())
    return llm.tokenizer.encode(text)[:n]


def test_logits_match_transformers(llm, hf_smollm2):
    hf, _ = hf_smollm2
    ids = _prompt_ids(llm, 200)
    x = torch.tensor(ids)
    with torch.no_grad():
        ref = hf(x[None]).logits[0]
        got = llm.loaded.model(x, make_cache("exact", llm.args, 256), all_logits=True)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < 1e-4 * scale  # "well under 1e-3 of the logit scale"


def test_greedy_tokens_match_transformers(llm, hf_smollm2):
    hf, _ = hf_smollm2
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = llm.engine.render(messages)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(ids):]
    events = list(llm.stream(messages, max_tokens=32, stop=[]))
    got = [t for e in events for t in getattr(e, "token_ids", [])]
    n = len(got)  # stops early only at the end-of-turn token, which transformers (min_new_tokens) skips
    assert got == ref[:n].tolist()
    assert n >= 8


def test_tokenizer_and_template_match_transformers(llm, hf_smollm2):
    _, tok = hf_smollm2
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂, ça va?"},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Name a river."}]
    ref = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert llm.engine.render(messages) == list(ref)


def test_answers_paris(llm):
    reply = llm.generate("What is the capital of France?", max_tokens=24)
    assert "Paris" in reply
