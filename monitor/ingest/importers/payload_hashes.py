"""The payload hashes of imported step rows: what makes a re-import a replay.

A step row's ``payload_hash`` digests what it holds (its quantities; not its step or wall
time), so importing the same file again finds every step stored with the same hash (a
duplicate), and a file that changed finds another one (a conflict). Two schemes:

- :func:`quantity_hashes` (``v2:`` and 32 hex digits): the step rows of a numeric step table,
  computed a column at a time with numpy (splitmix64 over each present value's float64 bits
  and its name, two 64-bit lanes): about 10 ms for 200k rows where a SHA-256 of a JSON text
  per row took 0.8 s.
- :func:`payload_hash` (64 hex digits, the only one before ``v2``): a SHA-256 of the row's
  JSON, for the rows that hold more than numbers (a klmon export's status, a tokens log).

The store compares hashes of one scheme only (a prefix before ``:`` names it); a row stored
under another scheme (a database filled before ``v2``) is compared by its values instead
(``step_writes._same_stored_values``), so re-importing over it still reports duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from monitor.ingest.importers.keys import is_int_quantity

#: The prefix of :func:`quantity_hashes`; the store reads the part before ``:`` as a scheme.
SCHEME = "v2:"
# byte -> its two hex digits as one uint16 (native order: viewed back as the two bytes)
_HEX_PAIRS = np.frombuffer(bytes(range(256)).hex().encode(), np.uint16)
_SEEDS = (np.uint64(0x6B6C6D6F6E2D7631), np.uint64(0x9E3779B97F4A7C15))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def payload_hash(row: dict[str, Any]) -> str:
    """A digest of what a step row holds (not its wall time): equal for a replayed import."""
    body = {k: v for k, v in row.items() if k not in ("wall_time", "payload_hash", "step")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def quantity_hashes(quantities: Mapping[str, np.ndarray], n: int) -> list[str]:
    """The ``v2`` payload hash of each of ``n`` rows of quantity columns (float64, NaN:
    absent): it depends on the names and values a row holds, not on the other columns (an
    absent value changes nothing), and integer quantities count as their rounded value."""
    lanes = [np.full(n, seed, dtype=np.uint64) for seed in _SEEDS]
    for name in sorted(quantities):
        values = np.asarray(quantities[name], dtype=np.float64)
        if is_int_quantity(name):
            values = np.round(values) + 0.0  # as stored (an integer), and -0.0 as 0
        present = ~np.isnan(values)
        if not present.any():
            continue
        bits = values.view(np.uint64)
        keys = np.frombuffer(hashlib.blake2b(name.encode(), digest_size=16).digest(), np.uint64)
        for lane, key in zip(lanes, keys, strict=True):
            mixed = _mix(lane ^ _mix(bits ^ key))
            np.copyto(lane, mixed, where=present)
    return _hex(lanes, n)


def quantity_hashes_of_rows(rows: Iterable[Mapping[str, Any]], names: Iterable[str]) -> list[str]:
    """:func:`quantity_hashes` of step rows as dicts (the row-by-row reader's), over the
    quantity columns ``names`` (a missing or None value: absent)."""
    rows = list(rows)
    columns = {
        name: np.array(
            [np.nan if (v := r.get(name)) is None else v for r in rows], dtype=np.float64
        )
        for name in names
    }
    return quantity_hashes(columns, len(rows))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on each element (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _hex(lanes: list[np.ndarray], n: int) -> list[str]:
    """``SCHEME`` and the lanes' 16 big-endian bytes as 32 hex digits, per row: one text
    of lines, split (a str per row from a numpy string array costs several times more)."""
    if n == 0:
        return []
    raw = np.stack(lanes, axis=1).astype(">u8").view(np.uint8).reshape(n, 16)
    start = len(SCHEME)
    text = np.empty((n, start + 33), dtype=np.uint8)
    text[:, :start] = np.frombuffer(SCHEME.encode(), dtype=np.uint8)
    text[:, start:-1] = np.take(_HEX_PAIRS, raw).view(np.uint8)
    text[:, -1] = ord("\n")
    return text.tobytes().decode("ascii").split("\n")[:n]
