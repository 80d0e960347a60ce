"""Fidelity measurement: how closely a sparse policy's next-token distributions follow exact attention.

``decode_logits`` is the core every comparison uses: logits of a continuation decoded one token at a time under
the loaded policy. ``fidelity`` runs it under the exact policy and under each sparse policy × budget on the same
text, and reports per context:

    KL(exact ‖ policy)   mean over the continuation's positions of sum_v p_exact(v) (log p_exact(v) - log p_policy(v))
    top-1 agreement      share of positions where both pick the same most likely token
    attention recall     share of the exact softmax mass that the policy's selection covered (from the policy's
                         ``stats()["attention_recall"]``, measured when the cache is made with ``measure_recall=True``)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .units import format_tokens


def _teacher_forced(engine, context_ids: list[int], continuation_ids: list[int]) -> tuple[torch.Tensor, object]:
    if not context_ids:
        raise ValueError("decode_logits needs at least one context token")
    seq = engine.new_sequence()
    engine.check_fits(seq, list(context_ids) + list(continuation_ids))
    chunk = engine.prefill_chunk
    logits = None
    for i in range(0, len(context_ids), chunk):
        logits = engine.prefill(seq, list(context_ids[i:i + chunk]))
    rows = [logits]
    for token in continuation_ids[:-1]:
        rows.append(engine.decode_one(seq, int(token)))
    return torch.stack(rows[:len(continuation_ids)]).float(), seq.cache


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
    return _teacher_forced(llm.engine, context_ids, continuation_ids)[0]


def read_texts(paths: list[str | Path]) -> str:
    """The files' text, in order, separated by blank lines; UserError for a file that is missing or not UTF-8."""
    texts = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"--text {name}: no such file")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--text {name}: cannot read it as UTF-8 text ({e})") from None
    return "\n\n".join(texts)


def sparse_policies() -> list[str]:
    """Every registered sparse policy (or just the reference while there is none)."""
    from .offload import policies

    return [p for p in policies.names() if policies.get(p).sparse] or [policies.REFERENCE]


def _engine(llm, policy: str, ctx_tokens: int, options: dict):
    from .runtime import Engine

    base = llm.engine
    return Engine(llm.loaded, ctx_tokens=ctx_tokens, policy=policy, prefill_chunk=base.prefill_chunk,
                  budgets=base.budgets, kv_dtype=base.kv_dtype, **options)


def _compare(ref: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref ‖ logits), top-1 agreement) of (M, vocab) logits, row by row."""
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (M,)
    agree = (ref.argmax(-1) == logits.argmax(-1)).double()
    return float(kl.mean()), float(agree.mean())


@torch.inference_mode()
def fidelity(llm, text_ids: list[int], ctxs: list[int], continuation: int, policies: list[str],
             budgets: list[tuple[str, int | float | None]] = (), progress: Callable[[str], None] | None = None,
             options: dict | None = None) -> list[dict]:
    """Fidelity of each policy × budget to exact attention, at each context, on one text.

    For each ``ctx`` the first ``ctx`` tokens of ``text_ids`` are the context and the next ``continuation``
    tokens are fed teacher-forced, once under the exact policy and once per policy × budget.

    Args:
        llm: a ``localkv.LLM`` (its weights, dtype, device, prefill chunk and tier budgets are reused).
        text_ids: the text as token ids; at least ``max(ctxs) + continuation`` of them.
        ctxs: context sizes in tokens.
        continuation: tokens scored after each context.
        policies: policy names; a sparse one gives a row per budget, any other one row (the reference: its
            check against itself).
        budgets: (label, value) pairs passed as the ``budget=`` option (tokens as int, share of the context as
            float, None for the policy's default); empty: each policy's own default.
        progress: called with a line before each run.
        options: more options for every sparse policy (``--policy-opt``; ``policy.key`` for one only).

    Returns:
        One dict per row: ``ctx``, ``policy``, ``budget`` (the label, None for exact or a default),
        ``kl``, ``top1``, ``attention_recall`` (1.0 for exact, None when the policy does not report it),
        ``retrieval_rate`` (the share of layer-steps that fetched, for a policy that reports it; else None).
    """
    from .offload import policies as registry

    options = dict(options or {})
    need = max(ctxs) + continuation
    if len(text_ids) < need:
        raise UserError(f"the text is {len(text_ids):,} tokens, shorter than the largest context plus the "
                        f"continuation ({format_tokens(max(ctxs))} + {continuation} = {need:,} tokens); "
                        f"give more or longer --text files, or lower --ctx")
    for policy in policies:   # unknown names and bad options fail before the first run
        spec = registry.get(policy)
        if spec.sparse:
            spec.parse({**registry.scoped(options, policy), "budget": None})
    say = progress or (lambda _: None)
    rows = []
    for ctx in ctxs:
        context, cont = list(text_ids[:ctx]), list(text_ids[ctx:ctx + continuation])
        say(f"{registry.REFERENCE} (the reference) at {ctx:,} tokens")
        ref, _ = _teacher_forced(_engine(llm, registry.REFERENCE, ctx + continuation + 1, {}), context, cont)
        for policy in policies:
            sparse = registry.get(policy).sparse
            runs = budgets if sparse and budgets else [(None, None)]
            for label, budget in runs:
                run_options = {**registry.scoped(options, policy), "measure_recall": True} if sparse else {}
                if budget is not None:
                    run_options["budget"] = budget
                say(f"{policy}{f' budget={label}' if label else ''} at {ctx:,} tokens")
                logits, cache = _teacher_forced(_engine(llm, policy, ctx + continuation + 1, run_options), context,
                                                cont)
                stats = cache.stats()
                kl, top1 = _compare(ref, logits)
                recall = stats.get("attention_recall") if sparse else 1.0
                held = sum(stats.get(f"{t}_tokens", 0) for t in ("gpu", "cpu", "disk"))
                rows.append({"ctx": ctx, "policy": policy, "budget": label, "kl": kl, "top1": top1,
                             "attention_recall": None if recall is None else float(recall),
                             "retrieval_rate": stats.get("retrieval_rate") if sparse else None,
                             "disk_share": stats.get("disk_tokens", 0) / held if held else 0.0,
                             "disk_pages_int4": stats.get("disk_pages_int4")})
    return rows


@torch.inference_mode()
def calibrate(llm, text_ids: list[int], ctx: int, continuation: int, policies: list[str],
              progress: Callable[[str], None] | None = None) -> dict[str, tuple[dict, Path]]:
    """Fit each policy that calibrates (`Policy.calibrate`) to ``llm``'s model on one teacher-forced run (the first
    ``ctx`` tokens of the text, then ``continuation`` decoded) and store what it fits beside the model cache
    (`models.calibration`), where later engines find it. Returns ``{policy: (options, file)}``."""
    from .models import calibration
    from .offload import policies as registry

    if len(text_ids) < ctx + continuation:
        raise UserError(f"calibrating needs {ctx + continuation:,} tokens of text, got {len(text_ids):,}")
    fitted = {}
    for policy in policies:
        spec = registry.get(policy)
        if type(spec).calibrate is registry.Policy.calibrate:
            continue
        (progress or (lambda _: None))(f"calibrating {policy} at {ctx:,} tokens")
        engine = _engine(llm, policy, ctx + continuation + 1, {})
        _, cache = _teacher_forced(engine, list(text_ids[:ctx]), list(text_ids[ctx:ctx + continuation]))
        options = spec.calibrate(cache)
        if options:
            fitted[policy] = (options, calibration.save(llm.loaded.source, policy, options))
    return fitted


def fidelity_table(rows: list[dict]) -> str:
    """``fidelity``'s rows as the table ``localkv eval`` prints."""
    lines = [f"{'ctx':<6}  {'policy':<12}  {'budget':<8}  {'KL(exact||policy)':>17}  {'top-1':>6}  "
             f"{'attention recall':>16}  {'retrieval':>9}  {'on disk':>7}"]
    for r in rows:
        recall = "n/a" if r["attention_recall"] is None else f"{r['attention_recall']:.3f}"
        rate = "-" if r.get("retrieval_rate") is None else f"{r['retrieval_rate']:.3f}"
        lines.append(f"{format_tokens(r['ctx']):<6}  {r['policy']:<12}  {r['budget'] or '-':<8}  {r['kl']:>17.2e}  "
                     f"{r['top1']:>6.3f}  {recall:>16}  {rate:>9}  {r.get('disk_share', 0.0):>7.0%}")
    return "\n".join(lines)
