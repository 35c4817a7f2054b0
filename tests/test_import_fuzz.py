"""Property tests (Hypothesis) for each importer's lines: whatever bad lines sit among good
ones (out-of-range steps, NUL bytes, invalid UTF-8, nesting past any limit, broken rows, noise),
every good row is read with its value, every bad one is listed with its line number, and the
only error ever raised is InvalidInput when nothing at all is readable."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from monitor.errors import InvalidInput
from monitor.ingest.importers import prepare_path

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.floats(allow_nan=False, allow_infinity=False, width=64)
# text on one line that is not a step row of any format (console noise, broken JSON, ...)
noise = st.text(
    alphabet=st.characters(blacklist_characters="\n\r{\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() and "step:" not in s)

COMMON_BAD: dict[str, Callable[[int, str], bytes]] = {
    "nul": lambda i, _t: b"%d\x00garbage" % i,
    "utf8": lambda i, _t: b"\xff\xfe%d" % i,
}


def _entries(bad_kinds: list[str]) -> st.SearchStrategy:
    """A list of ("good", value) and ("bad", kind, payload) entries."""
    good = st.tuples(st.just("good"), values)
    bad = st.tuples(st.just("bad"), st.sampled_from(bad_kinds), noise)
    return st.lists(st.one_of(good, bad), min_size=1, max_size=30)


def _run(
    entries: list,
    render_good: Callable[[int, float], bytes],
    render_bad: dict[str, Callable[[int, str], bytes]],
    *,
    header: bytes | None = None,
    suffix: str = ".log",
    fmt: str,
) -> tuple[dict[int, float], dict[int, int], object | None]:
    """Write the lines, read them; (expected step -> value, bad line -> index, Prepared)."""
    lines: list[bytes] = [header] if header is not None else []
    expected: dict[int, float] = {}
    bad_lines: dict[int, int] = {}
    n_good = 0
    for i, entry in enumerate(entries):
        if entry[0] == "good":
            n_good += 1
            lines.append(render_good(n_good, entry[1]))
            expected[n_good] = entry[1]
        else:
            lines.append(render_bad[entry[1]](i, entry[2]))
            bad_lines[len(lines)] = i
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log{suffix}"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            _f, prepared = prepare_path(path, fmt=fmt)
        except InvalidInput as exc:
            assert not expected, f"refused with {len(expected)} good rows: {exc}"
            assert "no steps could be read" in str(exc)
            return expected, bad_lines, None
    return expected, bad_lines, prepared


def _read(prepared, quantity: str) -> dict[int, float | None]:
    return {r["step"]: r.get(quantity) for r in prepared.steps}


JSONL_BAD = {
    **COMMON_BAD,
    "huge_step": lambda i, _t: b'{"step": %d, "reward": 1.0}' % (2**63 + i),
    "float_step": lambda i, _t: b'{"step": 1e300, "reward": 1.0}',
    "deep": lambda i, _t: b"[" * (2_000 + i),
    "deep_object": lambda i, _t: json.dumps({"step": 1, "a": _nest(40)}).encode(),
    "noise": lambda _i, t: t.encode(),
    # well-formed JSON whose key is not UTF-8 (pyarrow's reader failed on its name)
    "utf8_key": lambda i, _t: b'{"step": %d, "rew\xffard": 1.0}' % (10 * i + 5),
}


def _nest(depth: int) -> dict:
    obj: dict = {"x": 1}
    for _ in range(depth):
        obj = {"n": obj}
    return obj


@SETTINGS
@given(_entries(list(JSONL_BAD)))
def test_jsonl_lines(entries: list) -> None:
    expected, bad, prepared = _run(
        entries,
        lambda s, v: json.dumps({"step": s * 10, "reward": v}).encode(),
        JSONL_BAD,
        suffix=".jsonl",
        fmt="jsonl",
    )
    if prepared is None:
        return
    assert _read(prepared, "reward_mean") == {s * 10: v for s, v in expected.items()}
    assert {p.line for p in prepared.problems} == set(bad)


CSV_BAD = {
    **COMMON_BAD,
    "huge_step": lambda i, _t: b"%d,1.0" % (2**63 + i),
    "negative_step": lambda i, _t: b"-%d,1.0" % (i + 1),
    "fields": lambda i, _t: b"%d,1.0,2.0" % i,
    "text_step": lambda _i, t: ("x" + t.replace(",", " ").replace('"', "")).encode() + b",1",
}


@SETTINGS
@given(_entries(list(CSV_BAD)))
def test_csv_lines(entries: list) -> None:
    expected, bad, prepared = _run(
        entries,
        lambda s, v: b"%d,%s" % (s * 10, repr(v).encode()),
        CSV_BAD,
        header=b"step,reward",
        suffix=".csv",
        fmt="csv",
    )
    if prepared is None:
        return
    assert _read(prepared, "reward_mean") == {s * 10: v for s, v in expected.items()}
    assert {p.line for p in prepared.problems} == set(bad)


CONSOLE_BAD = {
    **COMMON_BAD,
    "broken_dict": lambda i, _t: b"{'loss': %d, 'kl': , 'epoch': 1}" % i,
    "deep_dict": lambda i, _t: b"{'loss': " + b"[" * 3000 + b"]" * 3000 + b", 'epoch': 1}",
}
CONSOLE_NOISE = {"noise": lambda _i, t: t.encode()}


@SETTINGS
@given(_entries([*CONSOLE_BAD, "noise"]))
def test_console_lines(entries: list) -> None:
    expected, bad, prepared = _run(
        entries,
        lambda _s, v: (
            f"{{'loss': '{v!r}', 'kl': {v!r}, 'completion_length': 12.0, 'epoch': 0.5}}"
        ).encode(),
        {**CONSOLE_BAD, **CONSOLE_NOISE},
        fmt="hf_console",
    )
    if prepared is None:
        return
    # the step is the order of the printed dicts; noise lines are ignored, bad dicts listed
    assert _read(prepared, "k3") == expected
    problem_lines = {p.line for p in prepared.problems}
    noise_lines = {n for n, i in bad.items() if entries[i][1] == "noise"}
    assert problem_lines == set(bad) - noise_lines


VERL_BAD = {
    **COMMON_BAD,
    "broken_item": lambda i, _t: b"step:%d - actor/kl_loss:0.1 - no colon here" % i,
    "huge_step": lambda i, _t: b"step:%d - actor/kl_loss:0.1" % (2**63 + i),
}


@SETTINGS
@given(_entries([*VERL_BAD, "noise"]))
def test_verl_lines(entries: list) -> None:
    expected, bad, prepared = _run(
        entries,
        lambda s, v: (
            b"(TaskRunner pid=1) step:%d - actor/kl_loss:%s - actor/pg_loss:0.0"
            % (s * 10, repr(v).encode())
        ),
        {**VERL_BAD, **CONSOLE_NOISE},
        fmt="verl",
    )
    if prepared is None:
        return
    assert _read(prepared, "k3") == {s * 10: v for s, v in expected.items()}
    noise_lines = {n for n, i in bad.items() if entries[i][1] == "noise"}
    assert {p.line for p in prepared.problems} == set(bad) - noise_lines


TRAINER_STATE_BAD = {
    "huge_step": lambda i, _t: {"step": 2**63 + i, "loss": 1.0},
    "deep": lambda i, _t: {"step": 1, "a": _nest(40)},
    "not_object": lambda i, _t: [i],
    "no_step": lambda _i, t: {"note": t},
}


@SETTINGS
@given(_entries(list(TRAINER_STATE_BAD)))
def test_trainer_state_entries(entries: list) -> None:
    history: list = []
    expected: dict[int, float] = {}
    bad: set[int] = set()
    for i, entry in enumerate(entries):
        if entry[0] == "good":
            step = len(expected) + 1
            history.append({"step": step * 5, "kl": entry[1], "completion_length": 3.0})
            expected[step * 5] = entry[1]
        else:
            history.append(TRAINER_STATE_BAD[entry[1]](i, entry[2]))
            bad.add(len(history))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer_state.json"
        path.write_text(json.dumps({"log_history": history, "global_step": 1}))
        try:
            _f, prepared = prepare_path(path)
        except InvalidInput as exc:
            assert not expected and "no steps could be read" in str(exc)
            return
    assert _read(prepared, "k3") == expected
    assert {p.line for p in prepared.problems} == bad


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_a_deeply_nested_document_is_refused_cleanly(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text('{"log_history": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(InvalidInput, match="nested too deeply"):
        prepare_path(path, fmt="trainer_state")


TOKENS_BAD = {
    **COMMON_BAD,
    "huge_step": lambda i, _t: json.dumps(
        {"step": 2**63 + i, "policy_logprobs": [-1.0], "ref_logprobs": [-1.0]}
    ).encode(),
    "lengths": lambda i, _t: json.dumps(
        {"step": 1, "policy_logprobs": [-1.0, -2.0], "ref_logprobs": [-1.0]}
    ).encode(),
    "deep": lambda i, _t: b"[" * (2_000 + i),
    "noise": lambda _i, t: t.encode(),
}


@SETTINGS
@given(_entries(list(TOKENS_BAD)))
def test_token_lines(entries: list) -> None:
    def good(s: int, v: float) -> bytes:
        lp = -min(abs(v), 50.0)
        row = {"step": s, "policy_logprobs": [lp, -1.0], "ref_logprobs": [lp, -1.5]}
        return json.dumps(row).encode()

    expected, bad, prepared = _run(entries, good, TOKENS_BAD, suffix=".jsonl", fmt="tokens")
    if prepared is None:
        return
    # one sequence a step: k1 is the mean over its two tokens of log p - log q
    assert {r["step"]: r["k1"] for r in prepared.steps} == pytest.approx(
        {s: 0.25 for s in expected}
    )
    assert {p.line for p in prepared.problems} == set(bad)


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("good"), values),
            st.tuples(st.just("bad"), st.sampled_from([-1.0, 1e300, 0.5, math.nan])),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_parquet_rows(rows: list) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    steps: list[float] = []
    expected: dict[int, float] = {}
    bad: set[int] = set()
    for number, (kind, v) in enumerate(rows, start=1):
        if kind == "good":
            steps.append(float(number * 10))
            expected[number * 10] = v
        else:
            steps.append(v)  # negative, out of range, fractional or missing
            bad.add(number)
    table = pa.table({"step": steps, "reward": [r[1] if r[0] == "good" else 1.0 for r in rows]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        pq.write_table(table, path)
        try:
            _f, prepared = prepare_path(path)
        except InvalidInput as exc:
            assert not expected and "no steps could be read" in str(exc)
            return
    assert _read(prepared, "reward_mean") == expected
    assert {p.line for p in prepared.problems} == bad
    assert {p.unit for p in prepared.problems} <= {"row"}


_ARROW_INTS = {  # Arrow integer type -> its range
    f"{u}int{bits}": ((0, 2**bits - 1) if u else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    for u in ("", "u")
    for bits in (8, 16, 32, 64)
}


@st.composite
def _arrow_column(draw: st.DrawFn) -> tuple[str, list[list[float | int | None]]]:
    """An Arrow type and its chunks' values: integers over each width's whole range (its
    extremes often), floats for the float types, nulls anywhere."""
    name = draw(st.sampled_from([*_ARROW_INTS, "float16", "float32", "float64", "null"]))
    lo, hi = _ARROW_INTS.get(name, (-(2**70), 2**70))
    number = st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0]))
    cell = st.none() if name == "null" else st.one_of(st.none(), number)
    return name, draw(st.lists(st.lists(cell, max_size=40), min_size=1, max_size=3))


@SETTINGS
@given(column=_arrow_column(), start=st.integers(0, 20))
def test_float_column_reads_every_arrow_number_as_pyarrow_does(
    column: tuple[str, list[list[float | int | None]]], start: int
) -> None:
    """The fast paths' own reading of pyarrow's buffers (its conversions would load pandas)
    gives float64 with NaN for null, for each chunk, a slice's offset and null bitmaps."""
    pa = pytest.importorskip("pyarrow")
    from monitor.ingest.importers.base import float_column

    name, chunks = column
    kind = getattr(pa, name)()
    if name in _ARROW_INTS or name == "null":
        arrays = [pa.array(c, kind) for c in chunks]
    else:
        floats = [[v if v is None else float(v) for v in c] for c in chunks]
        arrays = [pa.array(c, pa.float64()).cast(kind, safe=False) for c in floats]
    data = pa.chunked_array(arrays, kind)
    data = data.slice(min(start, len(data)))
    want = [math.nan if v is None else float(v) for v in data.to_pylist()]
    got = float_column(data)
    assert got.dtype.name == "float64"
    assert [math.nan if v != v else v for v in got.tolist()] == pytest.approx(want, nan_ok=True)
    assert [v != v for v in got.tolist()] == [v is None for v in data.to_pylist()]


# CSV cells a clean body may hold: numbers in every spelling, empty cells, spaces around a
# number, a cell of spaces, words of the number alphabet that are no number
_CSV_CELLS = st.one_of(
    values.map(repr),
    st.integers(-(2**60), 2**60).map(str),
    st.sampled_from(
        ["", "", " ", "1e999", "-1e999", "1e-400", "+1", "1.", ".5", "-.5", "00012", "-0",
         " 1.5", "2.5 ", "1e", "-", ".", "1..2", "--1", "1e5e5", "4.9e-324"]
    ),
)  # fmt: skip


@pytest.mark.parametrize("parser", ["pyarrow", "numpy"])
@SETTINGS
@given(
    rows=st.lists(st.lists(_CSV_CELLS, min_size=4, max_size=4), min_size=1, max_size=25),
    newline=st.sampled_from(["\n", "\r\n"]),
    blank_after=st.sets(st.integers(0, 25), max_size=3),
    step_at=st.integers(0, 4),
)
def test_csv_fast_path_reads_what_the_row_reader_reads(
    parser: str, rows: list[list[str]], newline: str, blank_after: set[int], step_at: int
) -> None:
    """Whatever cells a numeric CSV holds, the fast path (pyarrow's parser, or numpy's
    without pyarrow) gives the step rows, metrics, notes and problems of the row-by-row
    rules, or leaves the file to them."""
    from monitor.ingest.importers import csv_table, registry

    if parser == "pyarrow":
        pytest.importorskip("pyarrow")

    names = ["loss", "reward", "kl", "entropy"]
    lines = [",".join([*names[:step_at], "step", *names[step_at:]])]
    for i, cells in enumerate(rows):  # the step anywhere: a line may start or end empty
        lines.append(",".join([*cells[:step_at], str(i), *cells[step_at:]]))
        if i in blank_after:
            lines.append("")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.csv"
        path.write_bytes(newline.join(lines).encode() + newline.encode())

        def read() -> tuple:
            try:
                _f, p = prepare_path(path, fmt="csv")
            except InvalidInput as exc:
                return ("refused", str(exc))
            metrics = sorted(p.metrics, key=lambda m: (m[0], m[1]))
            metrics = [(s, n, None if v is None or v != v else v) for s, n, v in metrics]
            return (p.steps, metrics, p.notes, [str(x) for x in p.problems], p.mapping)

        build_frame = registry.build_frame
        built: list[object] = []
        try:
            csv_table.ARROW = parser == "pyarrow"
            registry.build_frame = lambda *a, **k: built.append(build_frame(*a, **k)) or built[-1]
            fast = read()
            event("columnar" if built and built[0] is not None else "row rules")
            registry.build_frame = lambda *a, **k: None
            slow = read()
        finally:
            registry.build_frame = build_frame
            csv_table.ARROW = True
    assert fast == slow


@SETTINGS
@given(
    rows=st.lists(
        st.lists(_CSV_CELLS.filter(lambda c: " " not in c), min_size=3, max_size=3),
        min_size=1,
        max_size=25,
    ),
    newline=st.sampled_from(["\n", "\r\n"]),
    delimiter=st.sampled_from([",", ";", "\t"]),
)
def test_csv_pyarrow_parser_reads_what_numpy_reads(
    rows: list[list[str]], newline: str, delimiter: str
) -> None:
    """The two parsers of a clean body give the same float64 bits (-0.0, subnormals, the
    last digit of long numbers) and missing cells; a cell pyarrow refuses is numpy's to
    decide, never the other way round."""
    pytest.importorskip("pyarrow")
    from monitor.ingest.importers import csv_table

    lines = [delimiter.join(["a", "b", "c"]), *(delimiter.join(r) for r in rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.csv"
        path.write_bytes(newline.join(lines).encode() + newline.encode())
        try:
            arrow = csv_table.read_frame(path, lambda n: None)
            csv_table.ARROW = False
            numpy = csv_table.read_frame(path, lambda n: None)
        finally:
            csv_table.ARROW = True
    event("both parsed" if arrow is not None else "left to numpy")
    if arrow is None:
        return
    assert numpy is not None
    assert arrow[1] == numpy[1]
    for name, column in arrow[0].items():
        assert column.view(np.int64).tolist() == numpy[0][name].view(np.int64).tolist(), name


def test_csv_empty_cells_anywhere_take_the_fast_path(tmp_path: Path) -> None:
    """Empty cells at a line's start and end and in runs, with CRLF: numpy reads them as
    missing (NaN, counted), with no row left to the row reader."""
    from monitor.ingest.importers import csv_table

    names = ["a", "b", "step", "c", "d", "e"]
    rows = [
        ["", "", "0", "", "4", "5"],
        ["1", "", "1", "", "", ""],
        ["", "2", "2", "", "", "5"],
        ["1", "2", "3", "3", "", ""],
    ]
    path = tmp_path / "log.csv"
    path.write_bytes("\r\n".join(",".join(r) for r in [names, *rows]).encode())
    read = csv_table.read_frame(path, lambda n: None)
    assert read is not None
    columns, missing = read
    for i, name in enumerate(names):
        want = [float(r[i]) if r[i] else math.nan for r in rows]
        assert columns[name].tolist() == pytest.approx(want, nan_ok=True), name
        assert missing[name] == sum(not r[i] for r in rows), name
