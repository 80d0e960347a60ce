"""A benchmark result for people (a table, printed last) and for machines (JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from ..units import format_bytes, format_tokens

_COLUMNS = ["ctx", "policy", "KV", "prefill tok/s", "ms/token", "p90", "floor ms", "ratio", "× weights", "GPU tier",
            "CPU tier", "disk tier", "H2D/tok", "disk/tok", "hit rate", "needles"]


def _num(value, spec: str = ",.1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _gbps(value) -> str:
    return "n/a" if value is None else f"{value:,.1f} GB/s"


def _cells(row: dict) -> list[str]:
    head = [format_tokens(row["ctx"]), row["label"]]
    if "error" in row:
        return head + [row["error"]] + [""] * (len(_COLUMNS) - 3)
    peak, moved = row.get("peak_bytes", {}), row.get("moved_bytes_per_token", {})
    return head + [
        row["kv"], _num(row["prefill_tok_s"], ",.0f"), _num(row["decode_ms_median"]), _num(row["decode_ms_p90"]),
        _num(row["floor_ms"]), _num(row["ratio"], ".2f", "x"), _num(row.get("ratio_weights"), ".2f", "x"),
        *(format_bytes(peak[t]) if t in peak else "n/a" for t in ("gpu", "cpu", "disk")),
        *(format_bytes(moved[k]) if k in moved else "n/a" for k in ("h2d", "disk_read")),
        _num(row.get("hit_rate"), ".1%"), _num(row.get("needle_recall"), ".2f"),
    ]


def _weights_ms(result: dict) -> float | None:
    return next((r["weights_floor_ms"] for r in result["rows"] if "weights_floor_ms" in r), None)


def table(result: dict) -> str:
    """The result as text: the machine and its ceilings, then one line per context × policy (or peer)."""
    m, c = result["meta"], result["ceilings"]
    lines = [f"{m['model']} on {m['device']}, {m['dtype']}, torch {m['torch']}, {m['date']}",
             f"ceilings: HBM copy {_gbps(c['hbm_copy_GBps'])} | pinned H2D {_gbps(c['h2d_pinned_GBps'])} | "
             f"host memcpy {_gbps(c['host_memcpy_GBps'])} | disk read {_gbps(c['disk_read_GBps'])}",
             f"weights {format_bytes(m['weights_bytes'])}, KV {format_bytes(m['kv_bytes_per_token'])}/token; "
             f"decode: median and p90 of {m['steps']} steps after {m['warmup']} warm-up"]
    if m["synthetic_kv"]:
        lines.append("KV synthesized straight into the tiers: prefill not measured")
    lines.append("floor: weights + resident KV read once at the measured device, PCIe and disk rates; "
                 f"× weights: against the weights alone at the device rate ({_num(_weights_ms(result))} ms)")
    grid = [_COLUMNS] + [_cells(row) for row in result["rows"]]
    measured = [_COLUMNS] + [_cells(row) for row in result["rows"] if "error" not in row]  # errors overflow
    widths = [max(len(r[i]) for r in (grid if i < 2 else measured)) for i in range(len(_COLUMNS))]
    lines.append("")
    lines += ["  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)).rstrip() for r in grid]
    split = [r for r in result["rows"] if r.get("decode_ms_by_kind")]
    if split:
        lines.append("")
    for r in split:   # a policy whose steps differ in kind (retrieve / reuse): each kind's median
        kinds = ", ".join(f"{k} {v['median_ms']:,.1f} ms ({v['steps']} steps)"
                          for k, v in r["decode_ms_by_kind"].items())
        rate = r.get("stats", {}).get("retrieval_rate")
        lines.append(f"{format_tokens(r['ctx'])} {r['label']}: {kinds}"
                     + (f"; retrieval rate {rate:.2f}" if rate is not None else ""))
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    """Write the result as indented JSON, making the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
