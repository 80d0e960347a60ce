"""What the sparse policies' tests share: tier budgets in pages of the tiny model, and a prefill-then-decode run."""

import torch

from localkv.offload.store import Budgets


def tier_budgets(args, tmp_path, gpu_pages, cpu_pages, page=32, parts=2):
    """Budgets of ``gpu_pages`` / ``cpu_pages`` fp32 pages of ``page`` tokens a layer, the disk under tmp_path."""
    page_bytes = parts * args.n_kv_heads * page * args.head_dim * 4
    return Budgets(page_bytes * args.n_layers * gpu_pages, page_bytes * args.n_layers * cpu_pages, tmp_path)


def run(model, cache, ids, cuts, decode_to):
    """Prefill ids in the given pieces, then decode one token at a time up to ``decode_to``; all logits."""
    out = [model(ids[a:b], cache, all_logits=True) for a, b in zip(cuts, cuts[1:])]
    out += [model(ids[t:t + 1], cache, decode=True) for t in range(cuts[-1], decode_to)]
    return torch.cat(out)
