"""The binary COPY stream built a column at a time (``_bulk.column_block``), read back with a
parser of PostgreSQL's binary COPY format: every row, with its NULLs, and nothing else."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.store._bulk import _SIGNATURE, _TRAILER, _binary_block, column_block

_UNPACK = {"int4": ">i", "int8": ">q", "float8": ">d"}


def _parse(block: bytes, types: list[str]) -> list[tuple[object, ...]]:
    """The rows of a binary COPY stream (header, tuples, trailer)."""
    assert block.startswith(_SIGNATURE) and block.endswith(_TRAILER)
    at, end, rows = len(_SIGNATURE), len(block) - len(_TRAILER), []
    while at < end:
        (count,) = struct.unpack_from(">h", block, at)
        assert count == len(types)
        at += 2
        row: list[object] = []
        for kind in types:
            (size,) = struct.unpack_from(">i", block, at)
            at += 4
            if size == -1:
                row.append(None)
                continue
            raw = block[at : at + size]
            at += size
            row.append(raw.decode() if kind == "text" else struct.unpack(_UNPACK[kind], raw)[0])
        rows.append(tuple(row))
    assert at == end
    return rows


_KINDS = st.sampled_from(["int4", "int8", "float8", "text"])


@st.composite
def _columns(draw: st.DrawFn) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None]]:
    n = draw(st.integers(1, 40))
    types = draw(st.lists(_KINDS, min_size=1, max_size=6))
    width = draw(st.integers(1, 40))
    values: list[np.ndarray] = []
    present: list[np.ndarray | None] = []
    for kind in types:
        if kind == "float8":
            floats = st.floats(allow_nan=False, width=64)
            values.append(np.array(draw(st.lists(floats, min_size=n, max_size=n)), np.float64))
        elif kind == "text":
            text = st.text("abcdef0123:", min_size=width, max_size=width)
            values.append(np.array(draw(st.lists(text, min_size=n, max_size=n)), dtype=object))
        else:
            bits = 31 if kind == "int4" else 63
            ints = st.integers(-(2**bits), 2**bits - 1)
            values.append(np.array(draw(st.lists(ints, min_size=n, max_size=n)), np.int64))
        nulls = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
        present.append(None if nulls is None else ~np.array(nulls, dtype=bool))
    return types, values, present


@settings(max_examples=150, deadline=None)
@given(_columns())
def test_a_column_block_holds_every_row_and_its_nulls(
    columns: tuple[list[str], list[np.ndarray], list[np.ndarray | None]],
) -> None:
    types, values, present = columns
    n = len(values[0])
    expected = [
        tuple(
            None
            if mask is not None and not mask[i]
            else (array[i] if kind == "text" else array[i].item())
            for array, mask, kind in zip(values, present, types, strict=True)
        )
        for i in range(n)
    ]
    block = column_block(values, present, types)
    assert block is not None
    got = _parse(block, types)
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    if all(mask is None for mask in present):
        assert got == expected  # one layout: the rows in order


def test_rows_a_block_cannot_hold_are_refused() -> None:
    """Out of int4's range, text of two lengths or not ASCII, a None in a tuple: no block
    (the caller writes the rows one by one)."""
    ints = np.array([1, 2**31])
    assert column_block([ints], [None], ["int4"]) is None
    assert column_block([ints], [np.array([True, False])], ["int4"]) is not None
    assert column_block([np.array(["ab", "abc"], dtype=object)], [None], ["text"]) is None
    assert column_block([np.array(["é"], dtype=object)], [None], ["text"]) is None
    assert _binary_block([(1, "ab"), (2, None)], ["int8", "text"]) is None
    assert _parse(_binary_block([(1, "ab"), (2, "cd")], ["int8", "text"]), ["int8", "text"]) == [
        (1, "ab"),
        (2, "cd"),
    ]
