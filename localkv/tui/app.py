"""The Textual chat app (``localkv run`` on a terminal): App -> screens/ -> widgets/.

    >>> import localkv
    >>> from localkv.tui.app import run_app
    >>> run_app(localkv.load())
"""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from .screens import ChatScreen


class LocalKVApp(App):
    """A chat with one loaded model. ``chat`` defaults to ``llm.chat(system)``."""

    CSS_PATH = "app.tcss"
    TITLE = "localkv"
    BINDINGS = [
        Binding("ctrl+c", "quit", "Quit", priority=True, show=False),
        Binding("q", "quit", "Quit", show=False),  # reaches here only when the message box is not focused
    ]

    def __init__(self, llm, *, system: str | None = None, options: dict | None = None, chat=None):
        super().__init__()
        self.llm = llm
        self.chat = chat if chat is not None else llm.chat(system)
        self.options = dict(options or {})
        self.sub_title = llm.loaded.source.name

    def get_default_screen(self) -> ChatScreen:
        return ChatScreen(self.llm, self.chat, self.options)

    async def action_quit(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                screen.cancel_reply()  # the worker thread ends at the next token or prefill chunk
        self.exit(0)


def run_app(llm, *, system: str | None = None, options: dict | None = None) -> int:
    """Run the chat app on ``llm`` until the user quits; returns the exit code.

    Args:
        llm: a loaded ``localkv.LLM``.
        system: the system prompt.
        options: keyword arguments for every ``Chat.send`` (max_tokens, temperature, seed, top_k, ...).
    """
    app = LocalKVApp(llm, system=system, options=options)
    app.run()
    return app.return_code or 0
