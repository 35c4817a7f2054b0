"""How one value is written out, decided once: as a JSON-safe Python value, as a number
for people, as a UTC time, and a token with its whitespace and special tokens visible.

Every layer needs these (the store before a write, the exports, the CLI's ``--json``, the
dashboard and the reports), so they live here, importing nothing of ours.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: '2024-05-01 12:34:56 UTC' (dashboard tables).
UTC_SECONDS = "%Y-%m-%d %H:%M:%S UTC"
#: '2024-05-01 12:34 UTC' (reports, where the minute is enough).
UTC_MINUTES = "%Y-%m-%d %H:%M UTC"
#: '2024-05-01 12:34:56Z' (the CLI's compact columns).
UTC_COMPACT = "%Y-%m-%d %H:%M:%SZ"


def json_safe(value: Any) -> Any:
    """A numpy/pandas scalar as the plain Python value; ``None`` for a missing one.

    NaN and ±inf mean "no data" here: JSON cannot hold them and PostgreSQL would store
    them verbatim, so they become ``None``, as do ``pd.NA`` and ``pd.NaT``. Lists and dicts
    are returned unchanged.
    """
    if value is None:
        return None
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing markers
        return None
    return value


def number_text(value: Any, digits: int = 4, *, whole: bool = False) -> str:
    """A number for a table cell or a message: ``-`` when missing or not finite, else
    ``digits`` significant digits (``whole``: a whole number below 1e12 in full). A value
    that is not a number is shown as it is."""
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "-"
    if whole and v == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.{digits}g}"


def utc_text(ts: Any, pattern: str = UTC_SECONDS, missing: str = "-") -> str:
    """Unix seconds as UTC text in ``pattern``; ``missing`` for None/NaN/non-numbers, and
    'Unix time N' for a time beyond the years a datetime can show."""
    try:
        t = float(ts)
    except (TypeError, ValueError):
        return missing
    if not math.isfinite(t):
        return missing
    try:
        return datetime.fromtimestamp(t, UTC).strftime(pattern)
    except (OverflowError, OSError, ValueError):
        return f"Unix time {t:.0f}"


#: How whitespace is drawn in a token: visible marks instead of blanks. Tokenizers' own
#: space and newline markers (GPT-2's 'Ġ'/'Ċ', SentencePiece's '▁') read the same way.
_TOKEN_MARKS = {
    " ": "␣",
    "\n": "↵",
    "\t": "\\t",
    "\r": "\\r",
    "Ġ": "␣",
    "Ċ": "↵",
    "▁": "␣",
}
#: Special tokens: '<|eos|>', '<|im_start|>', '</s>', '<unk>', '[CLS]', '[PAD]'.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,60}\|>|</?[a-z][a-z_0-9]{0,20}>|\[[A-Z][A-Z_0-9]{1,20}\]")


@dataclass(frozen=True)
class TokenShown:
    """A token as people see it: ``text`` with whitespace and control characters made
    visible (plain text: escape it for the medium, HTML or a plotly label), and whether it
    is a special token (``<|eos|>``, ``</s>``, ``[CLS]``) to be marked as one."""

    text: str
    special: bool


def show_token(text: str | None, token_id: int | None = None) -> TokenShown:
    """``text`` made visible: ' ' -> '␣', newline -> '↵', tab -> '\\t', other control
    characters as ``\\xNN``; the empty string as '∅'; no text (an id the run has no
    vocabulary for) as ``#id``. Every place that shows a token uses this."""
    if text is None:
        return TokenShown("#?" if token_id is None else f"#{int(token_id)}", False)
    if _SPECIAL.fullmatch(text):
        return TokenShown(text, True)
    out = []
    for ch in text:
        mark = _TOKEN_MARKS.get(ch)
        if mark is not None:
            out.append(mark)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return TokenShown("".join(out) or "∅", False)


def token_label(text: str | None, token_id: int | None = None) -> str:
    """A token for a sentence: ``'␣help'`` in quotes, a special token as ``<|eos|> (special)``."""
    shown = show_token(text, token_id)
    return f"{shown.text} (special)" if shown.special else f"'{shown.text}'"
