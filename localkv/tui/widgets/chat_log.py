"""The conversation: user turns, streamed Markdown assistant turns, and notices from the app (help, errors)."""

from __future__ import annotations

from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static


SHOWN_CHARS = 2000
"""A user turn longer than this shows its start only (a pasted book would make the log crawl)."""


def preview(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]} … ({len(text) - SHOWN_CHARS:,} more characters)"


class UserTurn(Static):
    """What the person sent (an attachment shows as a one-line summary, not its contents)."""

    def __init__(self, text: str, **kwargs):
        super().__init__(preview(text), markup=False, **kwargs)
        self.text = text

    def show(self, text: str) -> None:
        self.text = text
        self.update(preview(text))


class AssistantTurn(Vertical):
    """A reply that grows as tokens arrive, rendered as Markdown, with a status line under it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.text = ""
        self._stream = None

    def compose(self):
        yield Markdown(classes="body")
        yield Static("", classes="status", markup=False)

    def on_mount(self) -> None:
        self._stream = Markdown.get_stream(self.query_one(Markdown))

    async def write(self, text: str) -> None:
        """Append streamed text (MarkdownStream merges appends when rendering falls behind)."""
        self.text += text
        if self._stream is not None:
            await self._stream.write(text)

    def set_status(self, text: str) -> None:
        status = self.query_one(".status", Static)
        status.update(text)
        status.display = bool(text)

    async def finish(self, status: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.set_status(status)


class ChatLog(VerticalScroll):
    """The scrolling history; it follows new text unless the reader has scrolled up."""

    def on_mount(self) -> None:
        self.anchor()

    async def add_user(self, text: str) -> UserTurn:
        turn = UserTurn(text)
        await self.mount(turn)
        return turn

    async def add_assistant(self) -> AssistantTurn:
        turn = AssistantTurn()
        await self.mount(turn)
        return turn

    async def add_notice(self, text: str, *, kind: str = "info", markdown: bool = False) -> Static | Markdown:
        """A line from the app, not the model; ``kind`` is ``info`` or ``error``."""
        notice = Markdown(text, classes=f"notice -{kind}") if markdown else Static(
            text, markup=False, classes=f"notice -{kind}")
        await self.mount(notice)
        return notice

    async def clear(self) -> None:
        await self.remove_children()

    async def show_messages(self, messages: list[dict], *, clear: bool = True) -> None:
        """Show a conversation's messages (a resumed session, or after /load)."""
        if clear:
            await self.clear()
        for m in messages:
            if m["role"] == "user":
                await self.add_user(m["content"])
            elif m["role"] == "assistant":
                turn = await self.add_assistant()
                await turn.write(m["content"])
                await turn.finish("")
            elif m["role"] == "system":
                await self.add_notice(f"system prompt: {m['content']}")
