"""Parsing of the sizes people type: token counts (``8K``, ``1M``) and byte budgets (``2GB``, ``512MB``)."""

from __future__ import annotations

import re

from .errors import UserError

_TOKEN_SUFFIX = {"": 1, "K": 1024, "M": 1024 * 1024}
_BYTE_SUFFIX = {
    "": 1, "B": 1,
    "K": 1024, "KB": 1024, "KIB": 1024,
    "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
    "G": 1024**3, "GB": 1024**3, "GIB": 1024**3,
    "T": 1024**4, "TB": 1024**4, "TIB": 1024**4,
}


def parse_tokens(text: str | int) -> int:
    """``"8192"``, ``"8K"``, ``"128k"``, ``"1M"`` -> a token count (K = 1024, as context sizes are written)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
        if not m:
            raise UserError(f"cannot read {text!r} as a token count (examples: 8192, 8K, 128K, 1M)")
        value = int(float(m.group(1)) * _TOKEN_SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise UserError(f"a token count must be positive, got {text!r}")
    return value


def parse_bytes(text: str | int) -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5G"``, ``"0"`` -> bytes (binary multiples: 1 GB = 2**30 bytes)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _BYTE_SUFFIX:
            raise UserError(f"cannot read {text!r} as a size (examples: 512MB, 2GB, 1.5G)")
        value = int(float(m.group(1)) * _BYTE_SUFFIX[m.group(2).upper()])
    if value < 0:
        raise UserError(f"a size cannot be negative, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Bytes for people: ``1.5 GB``, ``512 MB``, ``3 KB`` (binary multiples)."""
    for unit, scale in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_tokens(n: int) -> str:
    """Token counts for people: ``8K``, ``128K``, ``1M``, ``1,234``."""
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def parse_budget(text: str | int | float) -> int | float:
    """A sparse policy's budget: ``"2048"`` or ``"2K"`` tokens (an int), or ``"1/16"``, ``"0.05"`` of the context
    (a float in (0, 1])."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/")
            value = float(num) / float(den)
        elif "." in s:
            value = float(s)
        else:
            return parse_tokens(s)
    except (ValueError, ZeroDivisionError, UserError):
        raise UserError(f"cannot read {text!r} as a budget (examples: 2048, 2K, 1/16, 0.05)") from None
    if not 0 < value <= 1:
        raise UserError(f"a budget given as a share of the context must be in (0, 1], got {text!r}")
    return value
