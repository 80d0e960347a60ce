"""Variable-size chunks from measured attention, and the min/max key abstracts that score them.

Everything here works in **units** of ``UNIT = 16`` tokens: every chunk boundary is a multiple of 16, so a chunk
is a run of whole units and the decode step gathers and attends in units (one `kernels.gather_pages` /
`kernels.sparse_attention` granule), whatever the chunk sizes are.

Tokens are chunked a *block* of ``B`` tokens at a time (``B`` a multiple of 16; a chunk never straddles blocks,
so ``B`` is also the largest chunk). The importance of block ``[s, s+B)`` is read from the ``Wq`` queries that
follow it, at positions ``s+B .. s+B+Wq-1``: for each such query ``p`` and query head ``h``

    a[p, h, t] = softmax_{t in block}(q[p, h] · k[t] / sqrt(D))      (keys of the block only)
    row[p, j]  = max_h  Σ_{t in unit j} a[p, h, t]                   (unit mass, max over every head of the layer)
    imp[j]     = Σ_p row[p, j] / Σ_{p, j} row[p, j]                  (the block's importance, summing to 1)

and `cut_variable` grows a chunk unit by unit while its importance stays under ``mass`` and its size under the
largest chunk: units holding much of the weight end up alone (16-token chunks), runs of near-zero weight
("attention deserts") become chunks of up to ``B`` tokens.

LeoAM (research/methods.md) scores with the last queries of each prefill chunk. Here the scoring queries of a
block are fixed by its position, and each query's row is normalised over the block alone, so a block's chunks
are a function of the token sequence: a prefill cut at other places, decode steps that seal generated tokens,
and a truncation followed by new tokens all give the chunks a run that never stopped would have (the rows of
the sealed blocks are kept on the host, ``Wq / 16`` floats a token, for a truncation back into a scoring window).
"""

from __future__ import annotations

import torch

UNIT = 16
"""Tokens per unit: every chunk boundary is a multiple of this."""


def unit_rows(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-query unit masses of blocks (the ``row[p, j]`` of the module docstring), one block or several at once.

    Args:
        q: (T, Hq, D) post-RoPE queries that score one block, or (m, T, Hq, D) for m blocks.
        keys: (Hkv, m * B, D) post-RoPE keys of the m blocks (m = 1 for one), B a multiple of `UNIT`.

    Returns:
        (T, B // UNIT) fp32 for one block, (m, T, B // UNIT) for m: each row's max over heads of the per-head
        unit mass.
    """
    single = q.dim() == 3
    if single:
        q = q[None]
    m, T, Hq, D = q.shape
    Hkv = keys.shape[0]
    G, B = Hq // Hkv, keys.shape[1] // m
    qg = q.float().view(m, T, Hkv, G, D).permute(2, 0, 3, 1, 4).reshape(Hkv, m, G * T, D)   # rows (g, t)
    s = (qg @ keys.float().view(Hkv, m, B, D).transpose(-1, -2)) * D ** -0.5               # (Hkv, m, G*T, B)
    a = torch.softmax(s, dim=-1).view(Hkv, m, G, T, B // UNIT, UNIT).sum(-1)              # unit mass
    rows = a.amax(dim=(0, 2))                                                               # (m, T, U)
    return rows[0] if single else rows


def cut_variable(rows: torch.Tensor, mass: float, max_units: int) -> list[int]:
    """Chunk sizes (in units) of one block from its query rows (Wq, U): greedy, left to right.

    A chunk takes the next unit unless it already holds one and either the unit would lift its importance past
    ``mass`` (a share of the block's, in (0, 1]) or it has ``max_units`` units. Sizes sum to U.
    """
    imp = rows.double().sum(0)
    imp = (imp / imp.sum().clamp_min(1e-30)).tolist()
    sizes, acc = [], 0.0
    for w in imp:
        if sizes and sizes[-1] and (acc + w > mass or sizes[-1] >= max_units):
            sizes.append(0)
            acc = 0.0
        if not sizes:
            sizes.append(0)
        sizes[-1] += 1
        acc += w
    return sizes


def cut_fixed(units: int, chunk_units: int) -> list[int]:
    """Equal chunks of ``chunk_units`` units over a block of ``units`` (the last shorter when it does not divide)."""
    return [min(chunk_units, units - a) for a in range(0, units, chunk_units)]


def abstracts(keys: torch.Tensor, sizes_units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max key of each chunk: (Hkv, C, D) each, from keys (Hkv, Σ sizes * UNIT, D).

    The upper bound a decode query scores a chunk with, ``Σ_d max(q_d kmin_d, q_d kmax_d) >= q·k`` for every key
    k of the chunk, needs exactly these two vectors (`kernels.chunk_scores` with ``kmin=``, ``kmax=``). Computed
    per unit, then reduced over each chunk's units (one scatter for any number of chunks)."""
    Hkv, n, D = keys.shape
    units = keys.view(Hkv, n // UNIT, UNIT, D)
    lo, hi = units.amin(2), units.amax(2)                                  # (Hkv, U, D)
    C = len(sizes_units)
    if C == n // UNIT:   # every chunk one unit
        return lo, hi
    chunk = torch.repeat_interleave(torch.arange(C, device=keys.device),
                                    torch.tensor(sizes_units, device=keys.device))
    index = chunk[None, :, None].expand(Hkv, -1, D)
    out = lo.new_empty(Hkv, C, D)
    return (out.scatter_reduce(1, index, lo, "amin", include_self=False),
            out.clone().scatter_reduce(1, index, hi, "amax", include_self=False))
