"""Fidelity measurement: logits of a continuation decoded one token at a time under the loaded policy.

Sparse policies are judged by how closely their next-token distributions follow exact attention on the same
text (KL divergence, top-1 agreement); ``decode_logits`` is the core every such comparison uses.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def decode_logits(llm, context_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """Teacher-forced logits of each continuation token, through the decode path of ``llm``'s policy.

    The context is prefilled (in the engine's chunks); then each continuation token is fed with a decode
    step. Row i holds the logits that predict ``continuation_ids[i]``.

    Args:
        llm: a ``localkv.LLM``.
        context_ids: the prompt, as token ids.
        continuation_ids: the tokens to score.

    Returns:
        (M, vocab) fp32 logits, M = len(continuation_ids).
    """
    if not context_ids:
        raise ValueError("decode_logits needs at least one context token")
    engine = llm.engine
    seq = engine.new_sequence()
    engine.check_fits(seq, list(context_ids) + list(continuation_ids))
    chunk = engine.prefill_chunk
    logits = None
    for i in range(0, len(context_ids), chunk):
        logits = engine.prefill(seq, list(context_ids[i:i + chunk]))
    rows = [logits]
    for token in continuation_ids[:-1]:
        rows.append(engine.decode_one(seq, int(token)))
    return torch.stack(rows[:len(continuation_ids)]).float()
