"""The benchmark's picture: decode ms/token against context, one line per policy and peer, as a PNG.

Drawn into a numpy RGB raster (lines, markers, grid, the 3x5 font of ``font.py``) and encoded by ``png.py``:
no plotting library needed. The context axis is logarithmic (base 2, ticks at powers of two), the time axis
linear from zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..units import format_tokens
from .font import text_mask
from .png import write_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
MARGIN = dict(left=80, right=20, top=40, bottom=56)


class Canvas:
    """An RGB raster with the few drawing operations a line plot needs; (x, y) pixels, y down."""

    def __init__(self, width: int, height: int):
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        h, w, _ = self.pixels.shape
        self.pixels[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) * 2 + 2  # two samples per pixel: no gaps
        xs = np.rint(np.linspace(x0, x1, n)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n)).astype(int)
        h, w, _ = self.pixels.shape
        for dx in range(-(width // 2), width - width // 2):
            for dy in range(-(width // 2), width - width // 2):
                x, y = xs + dx, ys + dy
                ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
                self.pixels[y[ok], x[ok]] = color

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 2, anchor: str = "left",
             vertical: bool = False) -> None:
        """Draw ``text`` with its top at ``y``; ``anchor`` left, center or right of ``x``."""
        mask = text_mask(text, scale)
        if vertical:
            mask = np.rot90(mask)
        mh, mw = mask.shape
        x = x - (mw // 2 if anchor == "center" else mw if anchor == "right" else 0)
        h, w, _ = self.pixels.shape
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y, xs + x
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        self.pixels[ys[ok], xs[ok]] = color


def nice_step(span: float, target: int = 5) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about ``target`` ticks over ``span``."""
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _fmt(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:,.{decimals}f}"


def line_plot(series: dict[str, list[tuple[float, float]]], *, width: int = 800, height: int = 480,
              title: str = "", xlabel: str = "", ylabel: str = "") -> np.ndarray:
    """An (height, width, 3) uint8 image of ``series`` (label -> [(x, y)]), x on a log2 axis, y from 0."""
    c = Canvas(width, height)
    left, right = MARGIN["left"], width - MARGIN["right"]
    top, bottom = MARGIN["top"], height - MARGIN["bottom"]
    points = [p for pts in series.values() for p in pts]
    lx = [math.log2(x) for x, _ in points] or [10.0]
    x_lo, x_hi = min(lx), max(lx)
    if x_hi - x_lo < 1:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = 0.05 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_step = nice_step(max([y for _, y in points] or [1.0]) * 1.05 or 1.0)
    y_hi = y_step * math.ceil(max([y for _, y in points] or [1.0]) * 1.05 / y_step)

    def px(x: float) -> float:
        return left + (math.log2(x) - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - y / y_hi * (bottom - top)

    # Grid and ticks: y every nice step, x at powers of two (every k-th, so that labels do not collide).
    for i in range(round(y_hi / y_step) + 1):
        y = py(i * y_step)
        c.line(left, y, right, y, GRID)
        c.text(left - 6, int(y) - 5, _fmt(i * y_step, y_step), anchor="right")
    first, last = math.ceil(x_lo), math.floor(x_hi)
    every = max(1, math.ceil((last - first + 1) / 10))
    for e in range(first, last + 1, every):
        x = px(2.0 ** e)
        c.line(x, top, x, bottom, GRID)
        c.text(int(x), bottom + 8, format_tokens(2 ** e) if e >= 0 else f"{2.0 ** e:g}", anchor="center")
    c.line(left, top, left, bottom, BLACK)
    c.line(left, bottom, right, bottom, BLACK)
    c.text(width // 2, 12, title, anchor="center")
    c.text((left + right) // 2, height - 20, xlabel, anchor="center")
    c.text(14, (top + bottom) // 2 - 4 * len(ylabel), ylabel, vertical=True)

    # The series, then a legend in the top-left corner of the plot area.
    for i, (label, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            c.line(px(x0), py(y0), px(x1), py(y1), color, width=2)
        for x, y in pts:
            c.rect(int(px(x)) - 3, int(py(y)) - 3, int(px(x)) + 4, int(py(y)) + 4, color)
    longest = max((len(label) for label in series), default=0)
    x0, y0, x1, y1 = left + 8, top + 8, left + 44 + 8 * longest, top + 14 + 16 * len(series)
    c.rect(x0, y0, x1, y1, WHITE)
    for a, b, d, e in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
        c.line(a, b, d, e, GRID)
    for i, label in enumerate(series):
        y = top + 14 + 16 * i
        c.rect(left + 14, y + 3, left + 34, y + 6, PALETTE[i % len(PALETTE)])
        c.text(left + 40, y, label)
    return c.pixels


def plot_result(result: dict, path: Path, width: int = 800, height: int = 480) -> None:
    """Write ``localkv bench``'s decode ms/token against context, one line per policy and peer, to ``path``."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if "error" not in row:
            series.setdefault(row["label"], []).append((row["ctx"], row["decode_ms_median"]))
    m = result["meta"]
    title = f"decode, {m['model']}, {m['device']}"
    image = line_plot(series, width=width, height=height, title=title[:width // 8 - 2],
                      xlabel="context (tokens)", ylabel="ms/token")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, image)
