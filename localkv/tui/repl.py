"""The plain line-by-line chat (``localkv run --no-tui``, or when the output is not a terminal)."""

from __future__ import annotations

import sys
import threading

HELP = """commands: /reset  forget the conversation   /system TEXT  set the system prompt
          /help   this text                  /quit (or Ctrl-D)  leave
Ctrl-C while a reply streams stops it; the partial reply is kept."""


def run_repl(llm, *, system: str | None = None, options: dict | None = None) -> int:
    """Read a line, stream the reply, repeat. Returns the exit code."""
    chat = llm.chat(system=system)
    options = options or {}
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"localkv: {llm.loaded.source.name}, context {llm.ctx_tokens:,} tokens. /help for commands.",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/bye"):
            return 0
        if text == "/help":
            print(HELP)
            continue
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            chat.reset(system=text[len("/system"):].strip() or None)
            print("(system prompt set; conversation cleared)", file=sys.stderr)
            continue
        cancel = threading.Event()
        try:
            for event in chat.send(text, cancel=cancel, **options):
                if event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            cancel.set()
            print("\n(stopped)", file=sys.stderr)
            continue
        except Exception as e:  # an error in one turn never ends the chat
            from ..errors import UserError

            if not isinstance(e, UserError):
                raise
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        last = chat.last
        if interactive and last is not None:
            print(f"({last.generated_tokens} tokens, {last.decode_tokens_per_s:.1f} tok/s; "
                  f"context {chat.context_tokens:,}/{llm.ctx_tokens:,})", file=sys.stderr)
