"""Token id -> text for the token ledger, given once per run (``monitor.init(tokenizer=...)``
or ``Run.set_vocabulary``): a list (index = id), a dict id -> text, or any object with
``convert_ids_to_tokens`` or ``decode`` (a Hugging Face tokenizer).

Strings are stored lazily: a step record carries the texts of the ledger ids this process has
not sent yet (``pending``), so a run stores the strings of the ids that appear in its stored
ledgers, never a whole 150k vocabulary. Only the processor thread calls ``pending`` (and the
caller's thread when it summarises a step itself): a lock keeps the two apart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.text import clean_text

#: Longest token text stored (a decoded token is short; a broken decoder must not be).
TOKEN_TEXT_MAX = 200


class Vocabulary:
    """Texts of token ids from one of the accepted sources (see the module doc)."""

    def __init__(self, source: Any) -> None:
        if isinstance(source, Mapping):
            self._lookup = _from_mapping(source)
        elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
            self._lookup = _from_list(source)
        elif callable(getattr(source, "convert_ids_to_tokens", None)):
            self._lookup = _from_method(source.convert_ids_to_tokens)
        elif callable(getattr(source, "decode", None)):
            self._lookup = _from_decode(source.decode)
        else:
            raise InvalidInput(
                f"tokenizer is a {type(source).__name__}: expected a list of token strings, "
                "a dict id -> string, or an object with convert_ids_to_tokens or decode"
            )
        self._source = source
        self._sent: set[int] = set()
        self._lock = threading.Lock()

    def fresh(self) -> Vocabulary:
        """The same texts with no id marked as sent: a step summarised again (a spilled raw
        step the committer replays after a failed write) carries all of its texts again."""
        return Vocabulary(self._source)

    def texts(self, ids: Iterable[int]) -> list[list[Any]]:
        """``[id, text]`` of ``ids``, none marked as sent (what a spilled raw step carries,
        for a ``klmon sync`` that has no tokenizer)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        with self._lock:
            texts = self._lookup(ids)
        return [[i, _clean(t)] for i, t in zip(ids, texts, strict=True)]

    def pending(self, ids: Iterable[int]) -> list[list[Any]]:
        """``[id, text]`` of the ids not sent yet (text None when the source lacks the id),
        and remember them as sent."""
        with self._lock:
            new = [int(i) for i in ids if int(i) not in self._sent]
            if not new:
                return []
            texts = self._lookup(new)
            self._sent.update(new)
        return [[i, _clean(t)] for i, t in zip(new, texts, strict=True)]


def _clean(text: Any) -> str | None:
    if text is None:
        return None
    return clean_text(str(text))[:TOKEN_TEXT_MAX]


def _from_mapping(m: Mapping[Any, Any]) -> Any:
    return lambda ids: [m.get(i) for i in ids]


def _from_list(seq: Sequence[Any]) -> Any:
    return lambda ids: [seq[i] if 0 <= i < len(seq) else None for i in ids]


def _from_method(convert: Any) -> Any:
    def lookup(ids: list[int]) -> list[Any]:
        try:
            return list(convert(ids))
        except Exception:  # a tokenizer that refuses one id must not lose the others
            return [_one(convert, i) for i in ids]

    return lookup


def _from_decode(decode: Any) -> Any:
    return lambda ids: [_one(decode, i) for i in ids]


def _one(fn: Any, arg: Any) -> Any:
    try:
        out = fn(arg if isinstance(arg, list) else [arg])
    except Exception:
        return None
    if isinstance(out, list):
        return out[0] if out else None
    return out
