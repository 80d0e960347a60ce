"""The chat screen: the conversation, the message box and the live side panel.

A reply runs in a thread worker that consumes ``Chat.send``'s event stream (the same stream the library
returns) and posts messages to this screen. Text deltas go through an ``Outbox`` that merges them into the one
``ReplyProgress`` the UI has not handled yet, so a fast model never queues more than one update.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Header, Static

from ...errors import UserError
from ...runtime.events import Done, PrefillProgress, TokenEvent
from ...units import format_tokens
from ..widgets import AssistantTurn, ChatLog, PromptInput, SidePanel, UserTurn
from .commands import CHARS_PER_TOKEN_MAX, HELP, SESSIONS_LATER, Attachment, Command, parse_command, read_attachment

HINT = "Enter send · Ctrl+J newline · Esc stop · /help · Ctrl+C quit"


@dataclass
class ReplyProgress(Message):
    """Reply events the UI has not shown yet: their text joined, the latest prefill and token events."""

    text: str = ""
    prefill: PrefillProgress | None = None
    token: TokenEvent | None = None
    context_tokens: int = 0


@dataclass
class AttachmentRead(Message):
    attachment: Attachment


@dataclass
class ReplyFinished(Message):
    done: Done | None = None
    """The reply's last event; None when it never started (cancelled while reading an attachment)."""
    error: Exception | None = None


@dataclass
class SessionFinished(Message):
    action: str
    path: str
    chat: Any = None
    error: Exception | None = None


class Outbox:
    """Thread-safe: the worker ``put``s events; the UI ``take``s the pending message when it handles it."""

    def __init__(self, post: Callable[[Message], Any]):
        self._post = post
        self._lock = threading.Lock()
        self._open: ReplyProgress | None = None

    def put(self, *, text: str = "", prefill: PrefillProgress | None = None, token: TokenEvent | None = None,
            context_tokens: int = 0) -> None:
        with self._lock:
            msg = self._open
            if msg is not None:  # posted but not handled yet: merge into it
                msg.text += text
                msg.prefill = prefill or msg.prefill
                prev = msg.token
                if token is not None and (token.token_ids or prev is None):  # not the tail (text only)
                    if not token.cache and prev is not None:   # most tokens carry no stats: keep the last
                        token = replace(token, cache=prev.cache)
                    msg.token = token
                msg.context_tokens = context_tokens
                return
            msg = self._open = ReplyProgress(text, prefill, token, context_tokens)
        self._post(msg)

    def take(self, msg: ReplyProgress) -> None:
        with self._lock:
            if self._open is msg:
                self._open = None


def model_lines(llm) -> list[str]:
    args = llm.args
    lines = [llm.loaded.source.name,
             f"{getattr(args, 'arch', '?')} · {getattr(args, 'n_layers', '?')} layers · dim {getattr(args, 'dim', '?')}",
             f"policy {llm.engine.policy} · context {format_tokens(llm.ctx_tokens)}"]
    device = getattr(getattr(llm.loaded, "model", None), "device", None)
    if device is not None:
        lines.append(f"device {device}")
    return lines


def done_status(done: Done | None, context_tokens: int, ctx_tokens: int) -> str:
    if done is None:
        return "stopped"
    parts = []
    if done.finish_reason == "cancelled":
        parts.append("stopped")
    elif done.finish_reason == "length":
        parts.append("context full" if context_tokens + 1 >= ctx_tokens else "max tokens reached")
    parts.append(f"{done.generated_tokens:,} tokens at {done.decode_tokens_per_s:,.1f} tok/s")
    if done.prompt_tokens:
        parts.append(f"prompt {done.prompt_tokens:,} tokens at {done.prefill_tokens_per_s:,.0f} tok/s")
    return " · ".join(parts)


class ChatScreen(Screen):
    BINDINGS = [Binding("escape", "stop", "Stop the reply", priority=True, show=False)]

    busy: reactive[bool] = reactive(False, init=False)
    """True while the model answers or a session saves/loads: the message box is locked, Esc still works."""

    def __init__(self, llm, chat, options: dict | None = None):
        super().__init__()
        self.llm = llm
        self.chat = chat
        self.options = dict(options or {})
        self._cancel = threading.Event()
        self._outbox = Outbox(self.post_message)
        self._turn: AssistantTurn | None = None
        self._user_turn: UserTurn | None = None
        self._replying = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="conversation"):
                yield ChatLog(id="log")
                yield PromptInput(id="prompt", placeholder="Message, or /help")
                yield Static(HINT, id="hint", markup=False)
            yield SidePanel(id="side")

    async def on_mount(self) -> None:
        side = self.query_one(SidePanel)
        side.show_model(model_lines(self.llm))
        side.show_cache({"tokens": self.chat.context_tokens, "capacity": self.llm.ctx_tokens})
        self._show_context()
        self.query_one(PromptInput).focus()
        log = self.query_one(ChatLog)
        await log.add_notice(f"{self.llm.loaded.source.name}, context {self.llm.ctx_tokens:,} tokens. Type a "
                             "message, /attach PATH to add a file or a directory, /help for more.")
        await log.show_messages(self.chat.messages, clear=False)  # a system prompt, or a resumed session

    # -- state ---------------------------------------------------------------------------------------------
    def watch_busy(self, busy: bool) -> None:
        prompt = self.query_one(PromptInput)
        prompt.read_only = busy
        prompt.set_class(busy, "-busy")
        prompt.border_title = "answering · Esc stops" if self._replying else ("working…" if busy else None)
        if not busy:
            prompt.focus()

    def _show_context(self, used: int | None = None) -> None:
        used = self.chat.context_tokens if used is None else used
        self.query_one(SidePanel).show_context(used, self.llm.ctx_tokens)

    def cancel_reply(self) -> None:
        """Ask the running reply to stop (the engine checks between prefill chunks and between tokens)."""
        self._cancel.set()

    def action_stop(self) -> None:
        if self._replying:
            self.cancel_reply()
            if self._turn is not None:
                self._turn.set_status("stopping…")
        elif not self.busy:  # Esc goes between the message box and the history (where q quits, arrows scroll)
            prompt = self.query_one(PromptInput)
            (self.query_one(ChatLog) if prompt.has_focus else prompt).focus()

    # -- input ---------------------------------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.busy:
            return
        event.prompt_input.clear()
        command = parse_command(text)
        if command is None:
            await self._ask(text, shown=text)
        else:
            await self._command(command)

    async def _command(self, cmd: Command) -> None:
        log = self.query_one(ChatLog)
        if cmd.name == "help":
            await log.add_notice(HELP, markdown=True)
        elif cmd.name == "reset":
            self.chat.reset()
            await log.clear()
            await log.add_notice("conversation cleared")
            self._show_context()
        elif cmd.name == "system":
            self.chat.reset(system=cmd.arg)  # "" removes it; None would keep the old one
            await log.clear()
            await log.add_notice(f"system prompt: {cmd.arg}; conversation cleared" if cmd.arg
                                 else "system prompt removed; conversation cleared")
            self._show_context()
        elif cmd.name == "attach":
            if not cmd.arg:
                await log.add_notice("usage: /attach PATH [question]", kind="error")
            else:
                await self._ask(None, shown=f"/attach {cmd.arg}", attach=cmd.arg)
        elif cmd.name in ("save", "load"):
            able = hasattr(self.chat, "save") if cmd.name == "save" else hasattr(self.llm, "load_session")
            if not cmd.arg:
                await log.add_notice(f"usage: /{cmd.name} PATH", kind="error")
            elif not able:
                await log.add_notice(SESSIONS_LATER)
            else:
                self.busy = True
                self._session(cmd.name, cmd.arg)
        elif cmd.name in ("quit", "exit"):
            await self.app.action_quit()
        else:
            await log.add_notice(f"unknown command /{cmd.name} (try /help)", kind="error")

    # -- a reply -------------------------------------------------------------------------------------------
    async def _ask(self, prompt: str | None, *, shown: str, attach: str | None = None) -> None:
        log = self.query_one(ChatLog)
        self._user_turn = await log.add_user(shown)
        self._turn = await log.add_assistant()
        self._turn.set_status("reading the attachment…" if attach else "reading the prompt…")
        self.query_one(SidePanel).show_decode(None, 0)
        self._cancel = threading.Event()
        self._replying = True
        self.busy = True
        self._generate(prompt, attach, self._cancel)

    @work(thread=True, exclusive=True, group="reply", exit_on_error=False)
    def _generate(self, prompt: str | None, attach: str | None, cancel: threading.Event) -> None:
        chat, outbox = self.chat, self._outbox
        try:
            if attach is not None:
                attachment = read_attachment(attach, max_chars=self.llm.ctx_tokens * CHARS_PER_TOKEN_MAX)
                self.post_message(AttachmentRead(attachment))
                if cancel.is_set():
                    self.post_message(ReplyFinished())
                    return
                prompt = attachment.message
            done = None
            for event in chat.send(prompt, cancel=cancel, **self.options):
                if isinstance(event, Done):
                    done = event
                elif isinstance(event, PrefillProgress):
                    outbox.put(prefill=event, context_tokens=chat.context_tokens)
                else:
                    outbox.put(text=event.text, token=event if isinstance(event, TokenEvent) else None,
                               context_tokens=chat.context_tokens)
            self.post_message(ReplyFinished(done=done))
        except Exception as e:  # shown in the chat: an error in one turn never ends the app
            self.post_message(ReplyFinished(error=e))

    @on(AttachmentRead)
    def _attachment_read(self, message: AttachmentRead) -> None:
        if self._user_turn is not None:
            a = message.attachment
            self._user_turn.show(a.summary() + (f"\n\n{a.question}" if a.question else ""))
        if self._turn is not None and not self._cancel.is_set():
            self._turn.set_status(f"reading the prompt ({a.chars:,} characters)…")

    @on(ReplyProgress)
    async def _progress(self, message: ReplyProgress) -> None:
        self._outbox.take(message)  # from here on the worker starts a new message
        side, turn = self.query_one(SidePanel), self._turn
        if message.prefill is not None:
            p = message.prefill
            side.show_prefill(p.done, p.total, p.tokens_per_s, p.eta_s)
            if turn is not None and message.token is None and not turn.text:
                turn.set_status(f"reading the prompt: {p.done:,} / {p.total:,} tokens ({p.done / max(p.total, 1):.0%})"
                                + (" · stopping…" if self._cancel.is_set() else ""))
        if message.token is not None:
            t = message.token
            if t.tokens_per_s:
                side.show_decode(t.tokens_per_s, t.n_generated)
            side.show_cache(t.cache, t.n_generated)
            if turn is not None and not self._cancel.is_set():
                turn.set_status("")
        self._show_context(message.context_tokens)
        if message.text and turn is not None:
            await turn.write(message.text)

    @on(ReplyFinished)
    async def _finished(self, message: ReplyFinished) -> None:
        log, side, turn = self.query_one(ChatLog), self.query_one(SidePanel), self._turn
        if message.error is not None:
            err = message.error
            if isinstance(err, UserError):
                text = f"error: {err}"
            else:
                text = f"error: internal fault: {type(err).__name__}: {err}"
                self.log.error("".join(traceback.format_exception(err)))
            if turn is not None:
                if turn.text:
                    await turn.finish("cut short by an error")
                else:
                    await turn.remove()
            if self._user_turn is not None and not (turn is not None and turn.text):
                self._user_turn.add_class("-failed")
            await log.add_notice(text, kind="error")
        else:
            done = message.done
            status = done_status(done, self.chat.context_tokens, self.llm.ctx_tokens)
            if turn is not None:
                await turn.finish(status)
            if done is not None:
                if done.generated_tokens:
                    side.show_decode(done.decode_tokens_per_s, done.generated_tokens)
                side.show_cache(done.cache, done.generated_tokens)
                side.show_last(status.replace(" · ", "\n"))
        self._show_context()
        self._turn = self._user_turn = None
        self._replying = False
        self.busy = False

    # -- sessions on disk ----------------------------------------------------------------------------------
    @work(thread=True, group="session", exit_on_error=False)
    def _session(self, action: str, path: str) -> None:
        try:
            p = Path(path).expanduser()
            chat = None
            if action == "save":
                self.chat.save(p)
            else:
                chat = self.llm.load_session(p)
            self.post_message(SessionFinished(action, str(p), chat))
        except Exception as e:
            self.post_message(SessionFinished(action, path, error=e))

    @on(SessionFinished)
    async def _session_finished(self, message: SessionFinished) -> None:
        log = self.query_one(ChatLog)
        if message.error is not None:
            err = message.error
            detail = str(err) if isinstance(err, UserError) else f"internal fault: {type(err).__name__}: {err}"
            await log.add_notice(f"error: /{message.action}: {detail}", kind="error")
        elif message.action == "save":
            await log.add_notice(f"session saved to {message.path}")
        else:
            self.chat = message.chat
            await log.show_messages(self.chat.messages)
            await log.add_notice(f"session loaded from {message.path} "
                                 f"({self.chat.context_tokens:,} tokens of context)")
        self._show_context()
        self.busy = False
