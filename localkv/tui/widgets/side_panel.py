"""The live side panel: model, context, prefill progress, decode speed, KV tiers and traffic.

It shows whatever the cache's ``stats()`` dict holds: ``tokens``, ``capacity`` and ``device_bytes`` for KV
that stays whole on the device; with the tiered store ``{gpu,cpu,disk}_{bytes,tokens}``, ``{gpu,cpu}_budget``
and the cumulative ``moved_bytes`` counters (turned into bytes per generated token here); ``hit_rate`` and a
draft acceptance rate when a policy reports them. Keys it does not know are listed as they are.
"""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from ...units import format_bytes

TIERS = ("gpu", "cpu", "disk")
ACCEPTANCE_KEYS = ("acceptance_rate", "draft_acceptance", "draft_acceptance_rate")
SHOWN_KEYS = {"tokens", "capacity", "device_bytes", "moved_bytes", "bytes_moved_per_token", "hit_rate",
              *ACCEPTANCE_KEYS,
              *(f"{t}_{k}" for t in TIERS for k in ("bytes", "tokens", "budget", "budget_bytes", "capacity_tokens"))}


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def format_rate(value: float) -> str:
    """A fraction (0..1) or a percentage as ``87.5%``."""
    return f"{value * 100 if value <= 1 else value:.1f}%"


def format_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "bytes" in key or "budget" in key:
        return format_bytes(value)
    if "rate" in key:
        return format_rate(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3g}"


def tier_rows(cache: dict) -> list[tuple[str, float | None, str]]:
    """(label, bar fraction or None, detail) per tier present in the stats; one ``KV`` row without tiers.

    A tier's bar is the part of its budget in use when the stats give one (``gpu_budget`` bytes, or
    ``gpu_capacity_tokens``), else its share of all the tokens held (the disk tier has no budget).
    """
    present = [t for t in TIERS if f"{t}_bytes" in cache or f"{t}_tokens" in cache]
    if not present:
        if "tokens" not in cache and "device_bytes" not in cache:
            return []
        tokens, capacity = cache.get("tokens"), cache.get("capacity")
        detail = " · ".join(x for x in (
            format_bytes(cache["device_bytes"]) if "device_bytes" in cache else "",
            f"{tokens:,} tok" if tokens is not None else "") if x)
        return [("KV", tokens / capacity if tokens is not None and capacity else None, detail)]
    total = cache.get("tokens") or sum(cache.get(f"{t}_tokens", 0) for t in TIERS)
    rows = []
    for t in present:
        tokens, nbytes = cache.get(f"{t}_tokens"), cache.get(f"{t}_bytes")
        budget = cache.get(f"{t}_budget") or cache.get(f"{t}_budget_bytes")
        size = format_bytes(nbytes) if nbytes is not None else ""
        if budget and nbytes is not None:
            fraction, size = nbytes / budget, f"{size} / {format_bytes(budget)}"
        elif cache.get(f"{t}_capacity_tokens") and tokens is not None:
            fraction = tokens / cache[f"{t}_capacity_tokens"]
        else:
            fraction = tokens / total if tokens is not None and total else None
        detail = " · ".join(x for x in (size, f"{tokens:,} tok" if tokens is not None else "") if x)
        rows.append((t.upper(), fraction, detail))
    return rows


class MovedPerToken:
    """Bytes moved per generated token over the reply so far, from the store's cumulative ``moved_bytes``."""

    def __init__(self):
        self._base: tuple[dict, int] | None = None

    def reset(self) -> None:
        self._base = None

    def update(self, moved: dict, n_generated: int) -> dict[str, float] | None:
        if self._base is None or n_generated < self._base[1]:
            self._base = (dict(moved), n_generated)
            return None
        base, n0 = self._base
        if n_generated == n0:
            return None
        return {k: (v - base.get(k, 0)) / (n_generated - n0) for k, v in moved.items()}


def traffic_lines(cache: dict, extra: dict | None = None, moved_per_token: dict | None = None) -> list[str]:
    """Bytes moved per token, hit rate, draft acceptance, then any keys this panel does not know."""
    lines = []
    moved = cache.get("bytes_moved_per_token", moved_per_token)
    if isinstance(moved, dict):
        lines.append("moved / token:")
        lines.extend(f"  {k.replace('_', ' ')}: {format_bytes(v) if isinstance(v, (int, float)) else v}"
                     for k, v in moved.items())
    elif isinstance(moved, (int, float)):
        lines.append(f"moved / token: {format_bytes(moved)}")
    if isinstance(cache.get("hit_rate"), (int, float)):
        lines.append(f"hit rate: {format_rate(cache['hit_rate'])}")
    chunks = cache.get("moved_bytes_per_token")   # a sparse policy's selected chunks, by the tier they came from
    if isinstance(chunks, dict):
        lines.append("chunks / token:")
        lines.extend(f"  {k.replace('_', ' ')}: {format_bytes(v)}" for k, v in chunks.items()
                     if isinstance(v, (int, float)))
    for source in (cache, extra or {}):
        for key in ACCEPTANCE_KEYS:
            if isinstance(source.get(key), (int, float)):
                lines.append(f"draft acceptance: {format_rate(source[key])}")
                break
    lines.extend(f"{k.replace('_', ' ')}: {format_value(k, v)}" for k, v in cache.items()
                 if k not in SHOWN_KEYS and not isinstance(v, (dict, list)))
    return lines


class Meter(Static):
    """A label and a value on one line, a bar under it."""

    def __init__(self, label: str, **kwargs):
        super().__init__(**kwargs)
        self.label = label
        self.fraction: float | None = None
        self.detail = ""

    def set(self, fraction: float | None, detail: str) -> None:
        self.fraction, self.detail = fraction, detail
        self.refresh()

    def render(self) -> Text:
        width = max(self.content_size.width, 10)
        text = Text(self.label, style="bold")
        text.append(" " + self.detail.rjust(max(width - len(self.label) - 1, 0)))
        if self.fraction is not None:
            f = min(max(self.fraction, 0.0), 1.0)
            filled = int(round(f * width))
            text.append("\n")
            text.append("━" * filled, style="green" if f < 0.9 else "red")
            text.append("━" * (width - filled), style="grey30")
        return text


class SidePanel(VerticalScroll):
    """Live numbers for the current model and reply; the screen calls ``show_*`` as events arrive."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._moved = MovedPerToken()

    def compose(self):
        yield Static("", id="model", markup=False)
        yield Static("Context", classes="heading")
        yield Meter("used", id="context")
        yield Static("Prefill", classes="heading")
        yield ProgressBar(total=1, show_eta=False, id="prefill-bar")
        yield Static("—", id="prefill", markup=False)
        yield Static("Decode", classes="heading")
        yield Static("—", id="decode", markup=False)
        yield Static("KV cache", classes="heading")
        yield Vertical(id="tiers")
        yield Static("", id="traffic", markup=False)
        yield Static("Last reply", classes="heading")
        yield Static("—", id="last", markup=False)

    def show_model(self, lines: list[str]) -> None:
        self.query_one("#model", Static).update("\n".join(lines))

    def show_context(self, used: int, limit: int) -> None:
        self.query_one("#context", Meter).set(used / limit if limit else None, f"{used:,} / {limit:,}")

    def show_prefill(self, done: int, total: int, tokens_per_s: float, eta_s: float) -> None:
        bar = self.query_one("#prefill-bar", ProgressBar)
        bar.update(total=max(total, 1), progress=done)
        text = f"{done:,} / {total:,} tokens\n{tokens_per_s:,.0f} tok/s"
        if done < total:
            text += f" · ETA {format_duration(eta_s)}"
        self.query_one("#prefill", Static).update(text)

    def show_decode(self, tokens_per_s: float | None, n_generated: int) -> None:
        """Decode speed; None while the reply has not started decoding (a new reply: traffic counts anew)."""
        if tokens_per_s is None:
            self._moved.reset()
        self.query_one("#decode", Static).update(
            "—" if tokens_per_s is None else f"{tokens_per_s:,.1f} tok/s · {n_generated:,} tokens")

    def show_cache(self, cache: dict, n_generated: int | None = None, extra: dict | None = None) -> None:
        """The cache's stats after a step; ``n_generated`` (tokens so far this reply) turns counters into rates."""
        if not cache:
            return
        try:
            per_token = None
            if isinstance(cache.get("moved_bytes"), dict) and n_generated is not None:
                per_token = self._moved.update(cache["moved_bytes"], n_generated)
            rows, lines = tier_rows(cache), traffic_lines(cache, extra, per_token)
        except Exception as e:  # stats of an unexpected shape must never take the chat down
            rows, lines = [], [f"cache stats unreadable: {type(e).__name__}: {e}"]
        box = self.query_one("#tiers", Vertical)
        wanted = {f"tier-{label.lower()}" for label, _, _ in rows}
        for stale in [m for m in box.children if m.id not in wanted]:  # "KV" gives way to GPU / CPU / DISK
            stale.remove()
        for label, fraction, detail in rows:
            meters = box.query(f"#tier-{label.lower()}")
            meter = meters.first(Meter) if meters else None
            if meter is None:
                meter = Meter(label, id=f"tier-{label.lower()}")
                box.mount(meter)
            meter.set(fraction, detail)
        traffic = self.query_one("#traffic", Static)
        traffic.update("\n".join(lines))
        traffic.display = bool(lines)

    def show_last(self, text: str) -> None:
        self.query_one("#last", Static).update(text)
