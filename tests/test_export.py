"""`klmon export` and the way back in: export -> import under a new name gives an identical
step table and identical metrics, on SQLite and PostgreSQL, as CSV, JSONL and Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.errors import InvalidInput, NotFound
from monitor.ingest.export import export_run
from monitor.ingest.importers import import_path
from monitor.store.database import Database
from monitor.store.metric_info import MetricInfo, read_metric_info, write_metric_info
from monitor.store.runs import get_or_create_run
from monitor.store.steps import (
    read_metrics,
    read_metrics_long,
    read_steps,
    write_metrics,
    write_steps,
)
from monitor.store.tables import STEP_QUANTITIES

FIXTURES = Path(__file__).parent / "fixtures" / "import"


def _rich_run(db: Database) -> int:
    """A run with every kind of thing a step table can hold."""
    run = get_or_create_run(db, "live", "ppo-a", config={"kl_coef": 0.05})
    rows = []
    for s in range(6):
        row = {q: 0.1 * s + i / 7 for i, q in enumerate(STEP_QUANTITIES)}
        row.update(step=s * 10, wall_time=1_700_000_000.123456 + s, n_sequences=64, n_tokens=9001)
        rows.append(row)
    rows[2] = {"step": 20, "wall_time": 1_700_000_002.5, "kl_mean": None, "k3": 1e-300}
    rows[3].update(status="rejected", reject_reason='NaN in logprobs, rank 1 "b"', kl_mean=None)
    rows[4].update(status="partial", ranks_seen=3)
    write_steps(db, run.id, rows)
    write_metrics(
        db,
        run.id,
        [
            (0, "loss", 0.5),
            (0, "kl_mean", 2.5),  # collides with a step column
            (0, "metric:odd", 1.0),
            (10, "lr", 3e-7),
            (10, "objective/kl", 12.345678901234567),
            (50, "loss", -1e-12),
            (70, "loss", 0.25),  # a step with metrics but no step row
        ],
    )
    write_metric_info(db, run.id, [MetricInfo("objective/kl", "trl-ppo", "kl_mean", "k1")])
    return run.id


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_export_then_import_is_identical(db: Database, tmp_path: Path, suffix: str) -> None:
    run_id = _rich_run(db)
    out = tmp_path / f"steps{suffix}"
    report = export_run(db, "live/ppo-a", out)
    assert report.steps == 7 and report.metrics == 5
    back = import_path(db, out, project="copies", name="ppo-a-copy")
    assert back.producer == "klmon" and back.problems == []
    assert back.run.id != run_id and back.run.source == f"import:{suffix[1:]}"
    original, copy = read_steps(db, run_id), read_steps(db, back.run.id)
    pd.testing.assert_frame_equal(original, copy)
    pd.testing.assert_frame_equal(read_metrics(db, run_id), read_metrics(db, back.run.id))
    assert set(copy["status"]) == {"ok", "partial", "rejected"}
    if suffix == ".parquet":  # Parquet also carries the run config and metric meanings
        assert read_metric_info(db, back.run.id) == read_metric_info(db, run_id)
        assert back.run.config["kl_coef"] == 0.05
    again = import_path(db, out, project="copies", name="ppo-a-copy")
    assert (again.steps_inserted, again.metrics_inserted) == (0, 0)


def test_imported_run_round_trips(db: Database, tmp_path: Path) -> None:
    first = import_path(db, FIXTURES / "trl_ppo.trainer_state.json")
    out = tmp_path / "ppo.csv"
    export_run(db, first.run.id, out)
    header = out.read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "wall_time", "status", "reject_reason", "ranks_seen"]
    assert "objective/kl" in header and "eval/loss" in header
    back = import_path(db, out, name="ppo-copy")
    pd.testing.assert_frame_equal(read_steps(db, first.run.id), read_steps(db, back.run.id))
    pd.testing.assert_frame_equal(read_metrics(db, first.run.id), read_metrics(db, back.run.id))


def test_export_jsonl_is_plain_json(db: Database, tmp_path: Path) -> None:
    _rich_run(db)
    out = tmp_path / "s.jsonl"
    export_run(db, "ppo-a", out)
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # no bare NaN
    assert ": NaN" not in out.read_text() and ": Infinity" not in out.read_text()
    assert rows[0]["kl_mean"] == pytest.approx(0.0) and rows[0]["metric:kl_mean"] == 2.5
    assert rows[0]["metric:metric:odd"] == 1.0
    assert rows[-1]["step"] == 70 and rows[-1]["status"] is None


def test_export_errors(db: Database, tmp_path: Path) -> None:
    _rich_run(db)
    with pytest.raises(InvalidInput, match="cannot tell the export format"):
        export_run(db, "ppo-a", tmp_path / "steps.xlsx")
    with pytest.raises(NotFound):
        export_run(db, "nope", tmp_path / "x.csv")
    with pytest.raises(InvalidInput, match="cannot write"):
        export_run(db, "ppo-a", tmp_path / "missing-dir" / "x.csv")
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_export(db_url: str, tmp_path: Path) -> None:
    db = Database.open(db_url)
    try:
        _rich_run(db)
    finally:
        db.dispose()
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["export", "live/ppo-a", "-o", str(out), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "wrote 7 steps" in result.output and out.exists()
    result = CliRunner().invoke(main, ["export", "ghost", "-o", str(out), "--db", db_url])
    assert result.exit_code == 1 and "Error: no run named 'ghost'" in result.output


#: Metric names that collide with export columns or need quoting in CSV.
HOSTILE_METRICS = ["step", "wall_time", "status", "metric:step", "k3", "a,b", 'q"uote', "new\nline"]


def _metric_rows(db: Database, run_id: int) -> list[tuple[int, str, float]]:
    long = read_metrics_long(db, run_id)
    columns = (long["step"].tolist(), long["name"].tolist(), long["value"].tolist())
    return sorted(zip(*columns, strict=True))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_export_metric_named_like_a_column(db: Database, tmp_path: Path, suffix: str) -> None:
    """A metric called ``step`` (or any step column) is exported as ``metric:<name>`` and
    comes back under its own name, next to the real step column."""
    run = get_or_create_run(db, "live", "odd-names")
    write_steps(db, run.id, [{"step": s, "wall_time": 1e9 + s, "kl_mean": s / 10} for s in (0, 5)])
    write_metrics(
        db, run.id, [(s, n, s + i / 8) for i, n in enumerate(HOSTILE_METRICS) for s in (0, 5)]
    )
    out = tmp_path / f"odd{suffix}"
    report = export_run(db, run.id, out)
    assert (report.steps, report.metrics) == (2, len(HOSTILE_METRICS))
    back = import_path(db, out, project="copies", name="odd-copy")
    assert back.producer == "klmon" and back.problems == []
    assert _metric_rows(db, back.run.id) == _metric_rows(db, run.id)
    steps = read_steps(db, back.run.id)
    assert steps["step"].tolist() == [0, 5] and steps["kl_mean"].tolist() == [0.0, 0.5]
    if suffix == ".jsonl":
        first = json.loads(out.read_text().splitlines()[0])
        assert first["step"] == 0 and first["metric:step"] == 0.0
        assert first["metric:metric:step"] == 3 / 8


def test_cli_export_metric_named_step(db_url: str, tmp_path: Path) -> None:
    db = Database.open(db_url)
    try:
        run = get_or_create_run(db, "live", "stepped")
        write_steps(db, run.id, [{"step": 1, "wall_time": 1e9}])
        write_metrics(db, run.id, [(1, "step", 7.0)])
    finally:
        db.dispose()
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(main, ["export", "stepped", "-o", str(out), "--db", db_url])
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0].split(",")[-1] == "metric:step"
