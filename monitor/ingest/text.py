"""Text at the ingest boundary: what both databases can store, the same way on each.

A Python ``str`` can hold what neither database takes: a lone surrogate (``"\\udcff"``, e.g.
from ``os.fsdecode`` of a non-UTF-8 byte) cannot be encoded to UTF-8 at all, and PostgreSQL
refuses NUL in text. So:

- free text (prompts, responses, token strings, reasons, strings inside config and tags):
  lone surrogates become U+FFFD and NUL characters are removed, silently, at the boundary;
- names (project, run, metric): lone surrogates become U+FFFD; NUL is refused with
  :class:`~monitor.errors.InvalidInput` naming the field, and so is a name longer than its
  column (``monitor.store.tables``), since changing a name would silently merge two series.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monitor.errors import InvalidInput
from monitor.store.tables import METRIC_NAME_MAX, runs

REPLACEMENT = "\ufffd"

RUN_NAME_MAX: int = runs.c.name.type.length  # type: ignore[attr-defined]
PROJECT_MAX: int = runs.c.project.type.length  # type: ignore[attr-defined]


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(s: str) -> str:
    """``s`` with lone surrogates replaced by U+FFFD and NUL removed (fast when clean)."""
    if "\x00" in s:
        s = s.replace("\x00", "")
    if s.isascii() or _encodable(s):
        return s
    return "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in s)


def clean_optional(s: Any) -> str | None:
    """None stays None; anything else as clean text (``str()`` of non-strings)."""
    if s is None:
        return None
    return clean_text(s if isinstance(s, str) else str(s))


def clean_strings(items: Sequence[Any]) -> list[str]:
    """A list of clean strings (token strings): one check over all of them in the usual case
    where none needs cleaning."""
    return clean_joined(items)[0]


def clean_joined(items: Sequence[Any]) -> tuple[list[str], str]:
    """``clean_strings(items)`` and their concatenation: in the usual case (all clean
    strings) both from one ``join``, which the sample codec would otherwise repeat."""
    try:
        joined = "".join(items)
    except TypeError:  # not all strings
        cleaned = [clean_text(t if type(t) is str else str(t)) for t in items]
        return cleaned, "".join(cleaned)
    if "\x00" not in joined and (joined.isascii() or _encodable(joined)):
        return (items if type(items) is list else list(items)), joined
    cleaned = [clean_text(t) for t in items]
    return cleaned, "".join(cleaned)


def clean_json(value: Any) -> Any:
    """A JSON-like value with every string in it (keys too) cleaned."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_json(k) if isinstance(k, str) else k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def check_name(value: Any, field: str, limit: int) -> str:
    """A name the database can hold unchanged (surrogates replaced), or InvalidInput."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise InvalidInput(f"{field} {value!r} contains a NUL character: not storable")
    value = clean_text(value)
    if len(value) > limit:
        raise InvalidInput(
            f"{field} is {len(value)} characters long: at most {limit} are stored "
            f"({value[:40]!r}...)"
        )
    return value


def check_metric_name(value: Any) -> str:
    """A metric name: non-empty, no NUL, at most METRIC_NAME_MAX characters."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(
            f"metric name {value!r} must be a non-empty string of at most "
            f"{METRIC_NAME_MAX} characters"
        )
    if len(value) > METRIC_NAME_MAX:
        raise InvalidInput(
            f"metric name {value[:40]!r}... is {len(value)} characters long: must be a "
            f"non-empty string of at most {METRIC_NAME_MAX} characters"
        )
    if "\x00" in value:
        raise InvalidInput(f"metric name {value!r} contains a NUL character: not storable")
    return clean_text(value)
