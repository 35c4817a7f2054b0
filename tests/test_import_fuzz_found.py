"""Files a mutation fuzzer of ``klmon import`` found crashing the import or read differently
by the columnar fast path and the row reader: each now gives a clean report (bad lines
listed, the others kept) or InvalidInput, and both paths agree."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest

from monitor.errors import InvalidInput
from monitor.ingest.importers import csv_table, import_path, jsonl, prepare_path
from monitor.store.database import Database
from monitor.store.runs import find_run_by_name
from monitor.store.steps import read_metrics


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_lone_carriage_return_in_a_csv_header_is_refused_cleanly(tmp_path: Path) -> None:
    log = _file(tmp_path, "log.csv", b"step\rx,kl\n0,1\n")
    assert csv_table.read_frame(log, lambda n: None) is None
    with pytest.raises(InvalidInput):
        prepare_path(log, fmt="csv")


def test_a_lone_carriage_return_in_a_csv_row_is_one_bad_row_on_both_paths(
    tmp_path: Path,
) -> None:
    """pandas breaks a line at a lone CR, the row reader refuses it: the fast path leaves
    such a file to the row reader."""
    log = _file(tmp_path, "log.csv", b"step,loss\n0,1.5\n1,-0.18\r405\n2,2.5\n")
    assert csv_table.read_frame(log, lambda n: None) is None
    _f, prepared = prepare_path(log, fmt="csv")
    assert [r["step"] for r in prepared.steps] == [0, 2]
    assert [p.line for p in prepared.problems] == [3]


def test_every_leading_byte_order_mark_of_a_csv_is_skipped(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    log = _file(tmp_path, "log.csv", bom + bom + b"step,kl\n5,1\n9007199254740993,2\n")
    frame, _missing = csv_table.read_frame(log, lambda n: None)
    assert list(frame) == ["step", "kl"]
    _f, prepared = prepare_path(log, fmt="csv")
    assert [r["step"] for r in prepared.steps] == [5, 9007199254740993]


def test_the_delimiter_sniffer_sees_short_lines_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard sniffer takes quadratic time in a long line after a quote (60k
    characters: 20 s, measured): it is given the first lines, each cut short."""
    seen: list[str] = []
    sniff = csv.Sniffer.sniff

    def recording(self: csv.Sniffer, sample: str, delimiters: str | None = None) -> type:
        seen.append(sample)
        return sniff(self, sample, delimiters)

    monkeypatch.setattr(csv.Sniffer, "sniff", recording)
    log = _file(tmp_path, "log.csv", b'step,kl\n"": 1,,2\n' + b" a" * 60_000 + b"\n3,4\n")
    with contextlib.suppress(InvalidInput):  # what is readable is not the point here
        prepare_path(log, fmt="csv")
    assert seen and all(
        len(line) <= csv_table._SNIFF_LINE for sample in seen for line in sample.split("\n")
    )
    assert csv_table.sniff_delimiter("step;kl\n" + "1;2\n" * 100) == ";"


def test_a_tokens_log_with_a_log_prob_past_float64_lists_that_line(tmp_path: Path) -> None:
    log = _file(
        tmp_path,
        "tokens.jsonl",
        b'{"step":0,"policy_logprobs":[-1.0,-2.0],"ref_logprobs":[-1.5,-2.5]}\n'
        b'{"step":0,"policy_logprobs":[' + b"9" * 400 + b'],"ref_logprobs":[-1]}\n',
    )
    _f, prepared = prepare_path(log)
    assert [r["step"] for r in prepared.steps] == [0]
    assert [p.line for p in prepared.problems] == [2]
    assert "not a float64" in prepared.problems[0].reason


def test_a_tokens_log_extra_key_with_a_lone_surrogate_is_stored_cleaned(
    db: Database, tmp_path: Path
) -> None:
    log = _file(
        tmp_path,
        "tokens.jsonl",
        b'{"step":0,"policy_logprobs":[-1],"ref_logprobs":[-1.5],"x\\ud800":1.5}\n',
    )
    import_path(db, log, project="p", name="r")
    run = find_run_by_name(db, "p", "r")
    assert run is not None
    assert read_metrics(db, run.id)["x\ufffd"].tolist() == [1.5]


def test_a_jsonl_of_empty_objects_is_refused_by_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _file(tmp_path, "log.jsonl", b"{}\n{}\n")
    monkeypatch.setattr(jsonl, "_arrow_columns", lambda data: None)  # installs without pyarrow
    assert jsonl.read_frame(log, lambda n: None) is None
    with pytest.raises(InvalidInput):
        prepare_path(log, fmt="jsonl")


@pytest.mark.parametrize(
    ("fmt", "data"), [("csv", b"step\n0\n1\n"), ("jsonl", b'{"step": 0}\n{"step": 1}\n')]
)
def test_a_table_of_steps_without_values_is_refused_by_both_paths(
    tmp_path: Path, fmt: str, data: bytes
) -> None:
    """The fast path stored step rows without a value where the row rules refuse the table
    (nothing to monitor): both refuse it now."""
    with pytest.raises(InvalidInput, match="no numeric values"):
        prepare_path(_file(tmp_path, f"log.{fmt}", data), fmt=fmt)


def test_missing_cells_of_a_column_whose_name_is_cleaned_are_not_called_non_finite(
    tmp_path: Path,
) -> None:
    """A column name with a NUL is stored cleaned; its missing cells were looked up by the
    cleaned name among counts kept by the raw one, and reported as NaN or infinite."""
    log = _file(tmp_path, "log.jsonl", b'{"step":0,"a\\u0000":1,"kl":1}\n{"step":1,"kl":2}\n')
    _f, prepared = prepare_path(log)
    assert not [n for n in prepared.notes if "NaN or infinite" in n]


def test_a_parquet_text_cell_that_is_not_utf8_is_one_bad_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tags = pa.array([b"ok", b"\xff", b"fine"]).view(pa.string())
    table = pa.table({"step": [1, 2, 3], "loss": [0.5, 0.25, 0.125], "tag": tags})
    pq.write_table(table, tmp_path / "log.parquet")
    _f, prepared = prepare_path(tmp_path / "log.parquet", fmt="parquet")
    assert [r["step"] for r in prepared.steps] == [1, 3]
    assert [(p.line, p.reason) for p in prepared.problems] == [(2, "a text cell is not UTF-8")]


@pytest.mark.parametrize("numeric_only", [True, False])
def test_parquet_columns_of_one_name_are_all_kept(tmp_path: Path, numeric_only: bool) -> None:
    """Two columns named ``loss`` kept only the last, silently: the second is read as
    ``loss.2``, as the CSV reader names a repeated header, and the notes say so."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    arrays = [pa.array([1, 2]), pa.array([1.0, None]), pa.array([None, 20.0])]
    names = ["step", "loss", "loss"]
    if not numeric_only:
        arrays.append(pa.array(["a", "b"]))
        names.append("note")
    pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp_path / "log.parquet")
    _f, prepared = prepare_path(tmp_path / "log.parquet", fmt="parquet")
    assert any("loss as loss.2" in n for n in prepared.notes)
    values = {(s, n): v for s, n, v in prepared.metrics}
    assert values[(1, "loss")] == 1.0 and values[(2, "loss.2")] == 20.0


def test_a_parquet_batch_the_fast_path_hands_back_is_read_from_the_file_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A numeric batch that needs the row rules (a negative step, here in the second batch)
    was rebuilt from its float64 columns: a NaN became a missing cell (its note lost) and
    the step a float in messages (``step -15.0``). The row rules now read the file's values,
    and say what a JSONL file of the same rows says."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from monitor.ingest.importers import parquet

    monkeypatch.setattr(parquet, "BATCH_CELLS", 4)  # two rows of two columns a batch
    rows = [
        {"step": 0, "loss": 0.5},
        {"step": 1, "loss": 0.25},
        {"step": -15, "loss": 1.0},
        {"step": 3, "loss": float("nan")},
        {"step": 4, "loss": 2.0},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "log.parquet")
    text = "".join(json.dumps(r) + "\n" for r in rows)  # NaN as JSON's NaN
    _file(tmp_path, "log.jsonl", text.encode())
    _f, from_parquet = prepare_path(tmp_path / "log.parquet", fmt="parquet")
    _f, from_jsonl = prepare_path(tmp_path / "log.jsonl", fmt="jsonl")
    assert [str(p) for p in from_parquet.problems] == [
        str(p).replace("line", "row") for p in from_jsonl.problems
    ]
    assert [(p.line, p.reason) for p in from_parquet.problems][:1] == [
        (3, "bad step: step -15 is negative")
    ]
    assert "NaN or infinite values stored as missing in: loss (1)" in from_parquet.notes
    assert [r["step"] for r in from_parquet.steps] == [0, 1, 4]


def test_a_parquet_file_read_in_batches_says_its_own_counts_and_keeps_one_step_rule(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch said its own count of NaN cells and identical notes were merged, so a file
    with one NaN per batch said ``loss (1)``; and a file whose first batch had no step column
    (epoch with fractions) took epoch as the step in a later batch while saying "row order".
    The notes now say the file's counts, and every batch keeps the first one's step rule."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from monitor.ingest.importers import parquet

    monkeypatch.setattr(parquet, "BATCH_CELLS", 6)  # two rows of three columns a batch
    nan = float("nan")
    table = pa.table(
        {
            "epoch": [0.5, 1.0, 7.0, 9.0, 11.0, 12.0],
            "loss": [nan, 1.0, nan, 2.0, nan, 3.0],
            "kl": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    pq.write_table(table, tmp_path / "log.parquet")
    note = "NaN or infinite values stored as missing in: loss (3)"
    _f, p = prepare_path(tmp_path / "log.parquet", fmt="parquet")
    assert [r["step"] for r in p.steps] == [0, 1, 2, 3, 4, 5]
    assert p.step_column is None and note in p.notes
    report = import_path(db, tmp_path / "log.parquet")
    assert note in report.notes and report.step_column is None
    run = find_run_by_name(db, "imported", "log")
    assert run is not None
    assert read_metrics(db, run.id)["step"].tolist() == [0, 1, 2, 3, 4, 5]
    # a step repeated within each of two batches: one note, the file's count
    repeats = pa.table({"step": [1, 1, 2, 2], "loss": [1.0, 2.0, 3.0, 4.0]})
    pq.write_table(repeats, tmp_path / "repeats.parquet")
    monkeypatch.setattr(parquet, "BATCH_CELLS", 4)
    _f, p = prepare_path(tmp_path / "repeats.parquet", fmt="parquet")
    said = [n for n in p.notes if "repeated a step" in n]
    assert said == ["2 rows repeated a step already seen: the later values kept"]
    assert [(s, v) for s, _n, v in sorted(p.metrics)] == [(1, 2.0), (2, 4.0)]


def test_a_tokens_log_extra_key_too_long_to_store_is_left_out_and_said(
    db: Database, tmp_path: Path
) -> None:
    """It failed the whole import at the metric store; the table importers drop (and say)
    such columns, and so does this one now."""
    long = "x" * 250
    log = _file(
        tmp_path,
        "tokens.jsonl",
        b'{"step":0,"policy_logprobs":[-1],"ref_logprobs":[-1.5],"%s":1.5,"ok":2.5}\n'
        % long.encode(),
    )
    report = import_path(db, log, project="p", name="r")
    assert any("over 200 characters not stored" in n for n in report.notes)
    run = find_run_by_name(db, "p", "r")
    assert run is not None
    assert read_metrics(db, run.id)["ok"].tolist() == [2.5]


def _both_paths(path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """(fast, row rules): what each path prepares from the file."""
    from monitor.ingest.importers import registry

    def read() -> tuple:
        try:
            _f, p = prepare_path(path, fmt=fmt)
        except InvalidInput as exc:
            return ("refused", str(exc))
        return p.steps, sorted(p.metrics), p.notes, [str(x) for x in p.problems]

    fast = read()
    monkeypatch.setattr(registry, "build_frame", lambda *a, **k: None)
    return fast, read()


@pytest.mark.parametrize(
    ("data", "metrics"),
    [
        (b"  \n1\n2\n", [(0, "1", 2.0)]),
        (b",\n1,2\n3,4\n", [(0, "1", 3.0), (0, "2", 4.0)]),
        (b"\t\n1\t2\n", None),
    ],
    ids=["spaces", "comma", "tab"],
)
def test_a_blank_first_line_of_a_csv_is_skipped_by_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, metrics: list | None
) -> None:
    """The fast path took a blank first line (spaces, delimiters) as the header, naming the
    columns column_1...; the row reader skips it and reads the next line as the header."""
    log = _file(tmp_path, "log.csv", data)
    assert csv_table.read_frame(log, lambda n: None) is None
    fast, rows = _both_paths(log, "csv", monkeypatch)
    assert fast == rows
    assert fast[0] == "refused" if metrics is None else fast[1] == metrics


def test_columns_of_as_many_non_finite_values_are_named_in_one_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ties were listed in column order by the fast path, in the order values came by the
    row rules: both list them by name now."""
    log = _file(tmp_path, "log.csv", b"step,b,a\n0,1,1e999\n1,1e999,1\n")
    fast, rows = _both_paths(log, "csv", monkeypatch)
    assert fast == rows
    assert "NaN or infinite values stored as missing in: a (1), b (1)" in fast[2]


def test_a_jsonl_minus_zero_among_floats_has_the_row_rules_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow reads the integer -0 in a column of floats as -0.0, JSON's rules as 0: the
    payload hash differed, so a re-import by the other path called the step a conflict."""
    pytest.importorskip("pyarrow")
    log = _file(tmp_path, "log.jsonl", b'{"response_length": 1.5}\n{"response_length": -0}\n')
    fast, rows = _both_paths(log, "jsonl", monkeypatch)
    assert fast == rows
    assert [r["payload_hash"] for r in fast[0]] == [r["payload_hash"] for r in rows[0]]


def test_a_blank_crlf_line_keeps_a_csv_on_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blank line of a CRLF file (its CR alone) is a blank line, not a row of one field:
    the file is read column-wise, with the row rules' result."""
    log = _file(tmp_path, "log.csv", b"step,kl\r\n0,1.5\r\n\r\n1,2.5\r\n\r\n")
    assert csv_table.read_frame(log, lambda n: None) is not None
    fast, rows = _both_paths(log, "csv", monkeypatch)
    assert fast == rows and [r["step"] for r in fast[0]] == [0, 1]
