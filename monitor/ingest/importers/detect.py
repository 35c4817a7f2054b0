"""Which format a file is in, from its content (the extension only says what to expect).

A ``.log``/``.txt`` or extension-less file may be anything klmon reads. A file whose content
contradicts its extension (binary junk named ``.json``, a CSV named ``.jsonl``, JSON named
``.csv``) is refused with a message naming the file, what the name promised and what the
content looks like; ``--format`` overrides the check.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from monitor.errors import InvalidInput
from monitor.ingest.importers import csv_table, hf_console, tokens, trainer_state, verl

_HEAD = 64 * 1024
_SNIFF_LINES = 20
_MAX_SNIFF = 64 * 1024 * 1024

TITLES: dict[str, str] = {
    "trainer_state": "a Hugging Face trainer_state.json (a JSON object with log_history)",
    "jsonl": "JSON Lines (one JSON object per line)",
    "tokens": "per-token JSON Lines (policy and reference log-probs per sequence)",
    "csv": "CSV with a header row",
    "parquet": "Parquet",
    "verl": "a veRL console log (step:N - key:value lines)",
    "hf_console": "a Hugging Face / TRL console log (the Trainer's printed {'loss': ...} dicts)",
    # what the sniffer may find that klmon does not read
    "binary": "binary data",
    "empty": "nothing (the file is empty)",
    "json-other": "a JSON document without log_history",
    "text": "text that is none of the formats klmon reads",
}

_JSON_FAMILY = ("trainer_state", "jsonl", "tokens")
EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".json": _JSON_FAMILY,
    ".jsonl": _JSON_FAMILY,
    ".ndjson": _JSON_FAMILY,
    ".csv": ("csv",),
    ".tsv": ("csv",),
    ".parquet": ("parquet",),
    ".pq": ("parquet",),
}
_PROMISE = {
    ".json": "JSON (trainer_state.json or JSON Lines)",
    ".jsonl": "JSON Lines",
    ".ndjson": "JSON Lines",
    ".csv": "CSV",
    ".tsv": "tab-separated CSV",
    ".parquet": "Parquet",
    ".pq": "Parquet",
}


def sniff(path: Path) -> str:
    """What the content of ``path`` looks like: a format name or binary/empty/json-other/text."""
    with path.open("rb") as fh:
        head = fh.read(_HEAD)
    if head.startswith(b"PAR1"):
        return "parquet"
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body:
        return "empty"
    if _is_binary(head):
        return "binary"
    # lines that are not text (skipped when read) say nothing about the format
    text = "\n".join(
        "" if _bad_line(line) else line.decode("utf-8", errors="replace")
        for line in head.split(b"\n")
    ).lstrip("\ufeff \t\r\n")
    if text.startswith("{'") and hf_console.is_console_dict(text.split("\n", 1)[0]):
        return "hf_console"
    if text.startswith("{"):
        return _sniff_json_object(path, text)
    if text.startswith("["):
        return "jsonl"
    if verl.LOOKS_LIKE.search(verl.strip_ansi(text)):
        return "verl"
    if hf_console.looks_like(path):
        return "hf_console"
    if _looks_like_csv(text):
        return "csv"
    return "text"


def detect_format(path: Path) -> str:
    """The format of ``path``, or InvalidInput saying what was expected and what was found."""
    found = sniff(path)
    suffix = path.suffix.lower()
    expected = EXTENSIONS.get(suffix)
    if expected is not None and found not in expected:
        hint = f"; pass --format {found} to read it anyway" if found in READABLE else ""
        raise InvalidInput(
            f"{path}: the name says {_PROMISE[suffix]} but the file holds {TITLES[found]}{hint}"
        )
    if found not in READABLE:
        raise InvalidInput(
            f"{path}: cannot read {TITLES[found]}; expected one of: "
            + "; ".join(TITLES[f] for f in READABLE)
        )
    return found


READABLE = ("trainer_state", "jsonl", "tokens", "csv", "parquet", "verl", "hf_console")


def _is_binary(head: bytes) -> bool:
    """Binary when most lines of the sample are not text (a NUL byte, not UTF-8): a text log
    with a few bad lines is read, the bad lines skipped and listed."""
    lines = head.split(b"\n")
    if len(lines) > 1 and len(head) == _HEAD:
        lines = lines[:-1]  # a line cut at the end of the sample
    bad = [_bad_line(line) for line in lines if line.strip()]
    return sum(bad) * 2 > len(bad)


def _bad_line(line: bytes) -> bool:
    if b"\x00" in line:
        return True
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _sniff_json_object(path: Path, text: str) -> str:
    """trainer_state, tokens or jsonl for a file starting with ``{``, from its first lines
    (read whole, however long: a per-token line can exceed the sniffed head)."""
    objects: list[object] = []
    with path.open("rb") as fh:
        budget = _MAX_SNIFF
        for _ in range(_SNIFF_LINES):
            raw = fh.readline(budget)
            if not raw:
                break
            budget -= len(raw)
            try:
                objects.append(json.loads(raw))
            except (ValueError, RecursionError):
                objects.append(None)
            if budget <= 0:
                break
    first = next((o for o in objects if o is not None), None) if objects else None
    if not isinstance(objects[0] if objects else None, dict):
        # not one object per line: a document spread over lines (pretty-printed
        # trainer_state.json: its reader reports any JSON error with line and column)
        if re.search(r'"log_history"\s*:\s*\[', text):
            return "trainer_state"
        if text.split("\n", 1)[0].strip() == "{":
            return _sniff_document(path)
    dicts = [o for o in objects if isinstance(o, dict)]
    if first is not None and trainer_state.is_trainer_state(first):
        return "trainer_state"
    if any(tokens.is_token_record(o) for o in dicts):
        return "tokens"
    return "jsonl" if dicts else _sniff_document(path)


def _sniff_document(path: Path) -> str:
    if path.stat().st_size > _MAX_SNIFF:
        return "json-other"
    try:
        doc = trainer_state.load_json(path)
    except InvalidInput:
        return "json-other"
    return "trainer_state" if trainer_state.is_trainer_state(doc) else "json-other"


def _looks_like_csv(text: str) -> bool:
    """A header of two or more fields, and most of the rows after it of the same width."""
    sample = text.rsplit("\n", 1)[0] if "\n" in text else text  # drop a cut last line
    delimiter = csv_table.sniff_delimiter(sample)
    try:
        rows = [r for r in csv.reader(io.StringIO(sample), delimiter=delimiter) if r][:50]
    except csv.Error:
        return False
    if len(rows) < 2 or len(rows[0]) < 2:
        return False
    same = sum(len(r) == len(rows[0]) for r in rows[1:])
    return same >= max(1, (len(rows) - 1) / 2)
