"""The chat screen's slash commands and the ``/attach`` file reader: plain functions, no Textual."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError

HELP = """\
**Commands**

- `/attach PATH [question]`: a text file, or a directory of text files, added to the conversation; \
then the model answers (quote a PATH with spaces)
- `/save PATH`, `/load PATH`: a session (its KV included) to disk and back
- `/system TEXT`: set the system prompt and start over (`/system` alone removes it)
- `/reset`: forget the conversation
- `/help`: this text; `/quit`: leave

**Keys**: Enter sends · Ctrl+J (or Shift+Enter, where the terminal reports it) adds a newline · \
Esc stops a reply (the part written so far is kept) · Tab moves the focus · Ctrl+C quits, and so does \
q when the message box is not focused (Esc leaves it).
"""

SESSIONS_LATER = "sessions on disk arrive with the tiered KV store"

COMMANDS = ("attach", "save", "load", "system", "reset", "help", "quit", "exit")

SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".hg", ".svn", ".venv", "venv"}

CHARS_PER_TOKEN_MAX = 8
"""An attachment longer than ``ctx_tokens * CHARS_PER_TOKEN_MAX`` characters cannot fit, whatever it says."""


@dataclass
class Command:
    name: str
    arg: str = ""


def parse_command(text: str) -> Command | None:
    """``/attach notes.txt what is it?`` -> ``Command("attach", "notes.txt what is it?")``; None for a message."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    head, _, rest = text[1:].partition(" ")
    if "\n" in head:
        head, _, more = head.partition("\n")
        rest = more + (" " + rest if rest else "")
    return Command(head.lower(), rest.strip())


def split_path(arg: str) -> tuple[str, str]:
    """``'"my notes.txt" question'`` -> ``("my notes.txt", "question")``; unquoted paths end at a space."""
    arg = arg.strip()
    if not arg:
        raise UserError("/attach needs a path: /attach PATH [question]")
    if arg[0] in "'\"":
        lexer = shlex.shlex(arg, posix=True)
        lexer.whitespace_split = True
        try:
            path = next(iter(lexer))
        except (ValueError, StopIteration) as e:
            raise UserError(f"cannot read the path in {arg!r}: {e}") from None
        end = arg.find(arg[0], 1)
        return path, arg[end + 1:].strip()
    path, _, question = arg.partition(" ")
    return path, question.strip()


@dataclass
class Attachment:
    """Files read for ``/attach``, and the one user message that carries them."""

    message: str
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Files of a directory left out: binary or unreadable."""
    chars: int = 0
    question: str = ""

    def summary(self) -> str:
        n = len(self.files)
        names = ", ".join(self.files[:3]) + (f" and {n - 3} more" if n > 3 else "")
        text = f"attached {names} ({n} file{'s' if n != 1 else ''}, {self.chars:,} characters)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} binary or unreadable file(s): " + ", ".join(self.skipped[:3])
        return text


def read_text(path: Path) -> str:
    """A file's text, or UserError if it is missing, unreadable or binary (NUL bytes or not UTF-8)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\0" in data:
        raise UserError(f"{path} looks like a binary file (it has NUL bytes); attach text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); attach text files only") from None
    return text.removeprefix("\ufeff")


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def read_attachment(arg: str, *, max_chars: int, cwd: Path | None = None) -> Attachment:
    """Read ``/attach``'s argument (``PATH [question]``) into one user message.

    Each file goes under a ``## name`` header (names relative to the attached directory); the question, if
    any, follows the files. A directory's binary files are skipped and listed; a binary single file is an
    error. Raises UserError for a missing path, an empty directory, or text too long for the context.
    """
    raw, question = split_path(arg)
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    if not path.exists():
        raise UserError(f"no such file or directory: {raw}")
    parts: list[str] = []
    att = Attachment(message="", question=question)
    if path.is_dir():
        for f in _walk(path):
            name = f.relative_to(path).as_posix()
            try:
                text = read_text(f)
            except UserError:
                att.skipped.append(name)
                continue
            parts.append(f"## {name}\n\n{text.rstrip()}\n")
            att.files.append(name)
            att.chars += len(text)
            if att.chars > max_chars:
                break
        if not att.files:
            raise UserError(f"{raw} has no text files to attach")
    else:
        text = read_text(path)
        parts.append(f"## {path.name}\n\n{text.rstrip()}\n")
        att.files.append(path.name)
        att.chars = len(text)
    if att.chars > max_chars:
        raise UserError(f"{raw} is over {max_chars:,} characters: more than the context can hold "
                        f"(raise --ctx, or attach less)")
    head = "Here are the contents of the attached file" + ("s" if len(att.files) > 1 else "") + ".\n\n"
    att.message = head + "\n".join(parts) + (f"\n{question}" if question else "")
    return att
