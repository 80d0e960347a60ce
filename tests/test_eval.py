"""decode_logits: the decode path, token by token, equals one full forward pass under the exact policy."""

import pytest
import torch

import localkv
from localkv.eval import decode_logits
from localkv.offload import make_cache
from tiny import write_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return localkv.load(write_model(tmp_path_factory.mktemp("eval") / "m", "llama"), ctx="2K", device="cpu",
                        dtype="fp32")


def test_decode_logits_equal_a_full_forward(llm):
    vocab = llm.args.vocab_size
    context = torch.randint(0, vocab, (int(torch.randint(20, 700, ())),)).tolist()
    continuation = torch.randint(0, vocab, (17,)).tolist()
    got = decode_logits(llm, context, continuation)
    ids = torch.tensor(context + continuation)
    with torch.inference_mode():
        full = llm.loaded.model(ids, make_cache("exact", llm.args, len(ids)), all_logits=True)
    ref = full[len(context) - 1:len(context) - 1 + len(continuation)]
    assert got.shape == (len(continuation), vocab)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
