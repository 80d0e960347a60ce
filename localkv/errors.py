"""Errors localkv raises on purpose.

`UserError` is what the person at the keyboard can fix (a path, a flag, a file, a budget): the CLI prints
its message on one line after ``error:`` and exits 2. Anything else escaping is a fault of ours (exit 1).
"""


class UserError(Exception):
    """Bad input from the user: a missing or broken file, an unsupported format, a context that cannot fit."""


class ModelFormatError(UserError):
    """A model file or directory that localkv cannot read (missing, truncated, unsupported)."""


class ContextOverflowError(UserError):
    """A prompt or conversation that does not fit in the context the user asked for."""


class TemplateError(UserError):
    """The model's chat template raised (``raise_exception`` in Jinja) or could not be rendered."""
