"""Make ``docs/tui-chat.svg`` (and ``.png`` when cairosvg is installed) from a real session on the embedded model.

    python tests/tui/make_screenshot.py [--question TEXT ...] [--size 120x40]

Not a test: it loads SmolLM2-135M (pulled on first use), asks its questions through the app with Pilot, waits
for each reply and saves the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import localkv
from localkv.tui.app import LocalKVApp
from localkv.tui.widgets import PromptInput

DOCS = Path(__file__).resolve().parents[2] / "docs"
QUESTIONS = ["What is the capital of France?"]


async def drive(app: LocalKVApp, questions: list[str], size: tuple[int, int], svg: Path) -> None:
    async with app.run_test(size=size) as pilot:
        for question in questions:
            app.screen.query_one(PromptInput).load_text(question)
            await pilot.press("enter")
            deadline = time.monotonic() + 600
            while app.screen.busy or not app.screen.chat.last:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to {question!r} in 10 minutes")
                await pilot.pause(0.1)
        await pilot.pause(0.5)
        app.save_screenshot(svg.name, path=str(svg.parent))


def to_png(svg: Path, png: Path) -> bool:
    """SVG -> PNG with cairosvg; the SVG names Fira Code, so use a monospace font that is installed."""
    try:
        import cairosvg
    except ImportError:
        return False
    text = svg.read_text().replace('"Fira Code"', '"DejaVu Sans Mono"').replace("Fira Code,", "DejaVu Sans Mono,")
    cairosvg.svg2png(bytestring=text.encode(), write_to=str(png), output_width=1800)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", action="append", help="ask this (repeatable)")
    parser.add_argument("--size", default="120x40", help="terminal columns x rows")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    llm = localkv.load()
    app = LocalKVApp(llm, options=dict(max_tokens=args.max_tokens))
    svg = DOCS / "tui-chat.svg"
    svg.parent.mkdir(exist_ok=True)
    asyncio.run(drive(app, args.question or QUESTIONS, (cols, rows), svg))
    print(svg)
    png = svg.with_suffix(".png")
    print(png if to_png(svg, png) else "cairosvg is not installed: no PNG (pip install cairosvg)")


if __name__ == "__main__":
    main()
