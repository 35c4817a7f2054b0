"""Importing into the store (SQLite and PostgreSQL): the run, idempotency, conflicts, metric
meanings, and the `klmon import` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.errors import InvalidInput
from monitor.ingest.importers import import_path, parse_map, prepare_path
from monitor.ingest.importers.importer import fingerprint
from monitor.ingest.importers.payload_hashes import payload_hash
from monitor.store.database import Database
from monitor.store.metric_info import (
    MetricInfo,
    metric_info_frame,
    read_metric_info,
    write_metric_info,
)
from monitor.store.runs import find_run_by_name, get_or_create_run
from monitor.store.series import read_series
from monitor.store.steps import read_metrics, read_steps

FIXTURES = Path(__file__).parent / "fixtures" / "import"


def test_metric_info_round_trip(db: Database) -> None:
    run = get_or_create_run(db, "p", "r")
    info = MetricInfo("kl", "trl-grpo", "k3", "k3", "token-mean", "GRPO kl")
    assert write_metric_info(db, run.id, [info, MetricInfo("loss")]) == 2
    # an existing meaning is left alone
    assert write_metric_info(db, run.id, [MetricInfo("kl", "other")]) == 0
    stored = read_metric_info(db, run.id)
    assert stored["kl"] == info
    assert stored["loss"] == MetricInfo("loss")
    assert list(metric_info_frame(db, run.id)["name"]) == ["kl", "loss"]


def test_import_creates_a_finished_run_with_meanings(db: Database) -> None:
    report = import_path(db, FIXTURES / "trl_ppo.trainer_state.json", project="rl")
    run = find_run_by_name(db, "rl", "trl_ppo")
    assert run is not None and report.created
    assert (run.status, run.source) == ("finished", "import:trainer_state")
    assert run.finished_at is not None
    assert run.config["trainer_state"]["max_steps"] == 30
    assert run.config["import"]["producer"] == "trl-ppo"
    steps = read_steps(db, run.id)
    assert list(steps["step"]) == [10, 20, 30]
    assert list(steps["kl_mean"]) == [0.12, 1.75, 2.4]
    assert set(steps["status"]) == {"ok"}
    metrics = read_metrics(db, run.id)
    assert metrics.set_index("step").loc[20, "eval/loss"] == 0.55
    assert metrics.set_index("step").loc[30, "objective/kl"] == 2.4
    infos = read_metric_info(db, run.id)
    assert infos["objective/kl"].quantity == "kl_mean"
    assert infos["objective/kl"].estimator == "k1"
    assert infos["policy/approxkl_avg"].quantity is None
    assert report.steps_inserted == 3 and report.metrics_inserted == len(
        metrics.melt(id_vars="step").dropna()
    )


def test_importing_twice_changes_nothing(db: Database) -> None:
    first = import_path(db, FIXTURES / "verl_console.log")
    before = (read_steps(db, first.run.id), read_metrics(db, first.run.id))
    again = import_path(db, FIXTURES / "verl_console.log")
    assert again.run.id == first.run.id and not again.created
    assert (again.steps_inserted, again.metrics_inserted) == (0, 0)
    assert again.steps_unchanged == 3 and again.metrics_unchanged == first.metrics_inserted
    assert again.step_conflicts == () and again.metric_conflicts == []
    after = (read_steps(db, first.run.id), read_metrics(db, first.run.id))
    assert before[0].equals(after[0]) and before[1].equals(after[1])
    assert any("already stored and unchanged: 3 steps" in line for line in again.summary_lines())


def test_a_changed_file_never_goes_into_the_first_files_run(db: Database, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text('{"step": 1, "reward": 1.0}\n{"step": 2, "reward": 2.0}\n')
    first = import_path(db, log)
    log.write_text(
        '{"step": 1, "reward": 1.0}\n{"step": 2, "reward": 9.0}\n{"step": 3, "reward": 3.0}\n'
    )
    second = import_path(db, log)
    # under the default name: a run of its own, named after the file and its fingerprint
    assert second.created and second.run.id != first.run.id
    assert second.renamed_from == "run"
    assert second.run.name == "run-" + fingerprint(log).split(":")[1][:8]
    assert any(
        "holds another file" in line and second.run.name in line for line in second.summary_lines()
    )
    assert list(read_steps(db, first.run.id)["reward_mean"]) == [1.0, 2.0]
    assert list(read_steps(db, second.run.id)["reward_mean"]) == [1.0, 9.0, 3.0]
    assert first.run.config["import"]["source"] != second.run.config["import"]["source"]
    # the second file again: the same (second) run, nothing new
    again = import_path(db, log)
    assert (again.run.id, again.steps_inserted, again.metrics_inserted) == (second.run.id, 0, 0)
    # under a name given with --run that holds another file: refused, nothing written
    with pytest.raises(InvalidInput, match=r"already holds another file .* another --run name"):
        import_path(db, log, name="run")
    assert list(read_steps(db, first.run.id)["reward_mean"]) == [1.0, 2.0]


def test_same_file_with_another_map_reports_conflicts_and_keeps_stored_values(
    db: Database, tmp_path: Path
) -> None:
    log = tmp_path / "run.jsonl"
    log.write_text('{"step": 1, "score": 1.0, "r2": 5.0}\n{"step": 2, "score": 2.0, "r2": 6.0}\n')
    import_path(db, log)
    report = import_path(db, log, mapping=parse_map(["r2=reward_mean", "score=-"]))
    assert report.steps_inserted == 0 and report.step_conflicts == (1, 2)
    assert any(line.startswith("CONFLICT: 2 steps") for line in report.summary_lines())
    assert list(read_steps(db, report.run.id)["reward_mean"]) == [1.0, 2.0]


def test_a_reimport_over_hashes_of_the_json_scheme_finds_duplicates(
    db: Database, tmp_path: Path
) -> None:
    """Step rows stored by an import before the columnar hashes (``payload_hashes``' JSON
    scheme) are compared by their values: the same file again is a replay, a changed value
    still a conflict."""
    import numpy as np
    import pandas as pd

    n = 50
    rng = np.random.default_rng(3)
    log = tmp_path / "old.csv"
    pd.DataFrame(
        {"step": np.arange(n), "kl": rng.normal(size=n), "reward": rng.normal(size=n)}
    ).to_csv(log, index=False)
    first = import_path(db, log)
    _file, prepared = prepare_path(log)
    assert all(r["payload_hash"].startswith("v2:") for r in prepared.steps)
    old = {r["step"]: payload_hash(r) for r in prepared.steps}
    ph = db.paramstyle
    with db.begin() as conn:  # what the import stored before: SHA-256 hex digests
        conn.exec_driver_sql(
            f"UPDATE steps SET payload_hash = {ph} WHERE run_id = {ph} AND step = {ph}",
            [(h, first.run.id, s) for s, h in old.items()],
        )
        conn.exec_driver_sql(
            f"UPDATE steps SET reward_mean = 9.5 WHERE run_id = {ph} AND step = 7",
            (first.run.id,),
        )
    again = import_path(db, log)
    assert again.run.id == first.run.id and again.steps_inserted == 0
    assert again.steps_unchanged == n - 1 and again.step_conflicts == (7,)
    steps = read_steps(db, first.run.id).set_index("step")
    assert steps.loc[7, "reward_mean"] == 9.5  # a conflict is never overwritten
    with db.begin() as conn:  # and the stored hashes stay as they were
        stored = dict(
            conn.exec_driver_sql(
                f"SELECT step, payload_hash FROM steps WHERE run_id = {ph}", (first.run.id,)
            ).all()
        )
    assert stored == old


def test_skipped_lines_are_summarised(db: Database) -> None:
    report = import_path(db, FIXTURES / "steps.jsonl", name="s")
    lines = report.summary_lines(max_problems=2)
    assert lines[0].startswith("imported 4 steps, 11 metrics into run")
    assert "4 lines skipped (first shown):" in lines
    assert "  line 5: not valid JSON (Expecting ',' delimiter at column 44)" in lines
    assert "  ... and 2 more" in lines


def test_map_column_must_exist(db: Database) -> None:
    with pytest.raises(InvalidInput, match="has no column 'nope'"):
        import_path(db, FIXTURES / "steps.csv", mapping=parse_map(["nope=kl_mean"]))
    assert find_run_by_name(db, "imported", "steps") is None  # nothing written


def test_directory_with_checkpoints(db: Database, tmp_path: Path) -> None:
    out = tmp_path / "grpo-out"
    for n in (5, 30):
        (out / f"checkpoint-{n}").mkdir(parents=True)
    shutil.copy(FIXTURES / "trl_ppo.trainer_state.json", out / "checkpoint-30/trainer_state.json")
    (out / "checkpoint-5" / "trainer_state.json").write_text('{"log_history": []}')
    report = import_path(db, out)
    assert report.run.name == "grpo-out" and report.steps_inserted == 3


def test_cli_import(db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [str(FIXTURES / "steps.csv"), "--db", db_url, "--project", "custom", "--quiet"]
    result = runner.invoke(
        main,
        ["import", *args, "--run", "mine", "--map", "kl_vs_ref=kl_mean", "--config", "beta=0.1"],
    )
    assert result.exit_code == 0, result.output
    assert "imported 5 steps" in result.output
    assert "kl_mean <- kl_vs_ref" in result.output
    assert "line 5: 2 fields where the header has 5" in result.output
    db = Database.open(db_url)
    try:
        run = find_run_by_name(db, "custom", "mine")
        assert run is not None and run.config["beta"] == 0.1
        assert run.config["import"]["map"] == {"kl_vs_ref": "kl_mean"}
        assert read_steps(db, run.id)["kl_mean"].iloc[-1] == -2.5
    finally:
        db.dispose()
    bad = runner.invoke(main, ["import", *args, "--map", "kl_vs_ref=kl_avg"])
    assert bad.exit_code == 1
    assert "Error: --map kl_vs_ref=kl_avg: 'kl_avg' is not a klmon quantity" in bad.output
    wrong = runner.invoke(main, ["import", str(FIXTURES / "junk.json"), "--db", db_url])
    assert wrong.exit_code == 1 and "junk.json: the name says JSON" in wrong.output
    assert "Traceback" not in wrong.output


def test_cli_step_column_and_refusals(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "ppo.csv"
    log.write_text("update,kl,score\n1,0.1,1\n2,0.2,2\n")
    runner = CliRunner()
    args = ["import", str(log), "--db", db_url, "--quiet", "--project", "cli"]
    result = runner.invoke(main, [*args, "--step-column", "update", "--map", "kl=k3"])
    assert result.exit_code == 0, result.output
    assert "step from column update (--step-column)" in result.output
    assert "KL read from: kl -> k3 (k3, nats/token)" in result.output
    # another file under the same --run name: refused, no traceback
    other = tmp_path / "other.csv"
    other.write_text("update,kl\n1,0.5\n")
    refused = runner.invoke(main, ["import", str(other), "--db", db_url, "--project", "cli",
                                   "--run", "ppo"])  # fmt: skip
    assert refused.exit_code == 1 and "already holds another file" in refused.output
    assert "Traceback" not in refused.output
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_bytes(b"\x00\x01\n{broken\n")
    empty = runner.invoke(main, ["import", str(nothing), "--db", db_url, "--format", "jsonl"])
    assert empty.exit_code == 1 and "no steps could be read" in empty.output


def test_cli_help_has_examples() -> None:
    for cmd in ("import", "export"):
        result = CliRunner().invoke(main, [cmd, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"klmon {cmd}" in result.output


def test_report_is_json_friendly(db: Database) -> None:
    report = import_path(db, FIXTURES / "wandb_grpo.csv")
    assert json.dumps(report.mapping)
    assert report.mapping["k3"] == ["train/kl"]


def test_write_progress_counts_steps_then_metrics(db: Database) -> None:
    seen: list[tuple[str, int, int]] = []
    report = import_path(db, FIXTURES / "no_step.tsv", progress=lambda *a: seen.append(a))
    writes = [s for s in seen if s[0] == "write"]
    assert writes[-1] == ("write", 9, 9)  # 3 steps + 6 metrics
    assert report.steps_inserted == 3


def test_an_imported_run_gets_its_chart_rollups_on_the_first_read(
    db: Database, tmp_path: Path
) -> None:
    log = tmp_path / "long.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "kl_vs_ref": 0.01 * s}) + "\n" for s in range(400))
    )
    import_path(db, log, project="p", name="long", mapping=parse_map(["kl_vs_ref=kl_mean"]))
    run = find_run_by_name(db, "p", "long")
    with db.begin() as conn:
        stored = conn.exec_driver_sql(f"SELECT COUNT(*) FROM step_rollups WHERE run_id = {run.id}")
        assert stored.scalar() == 0  # a cache: the import leaves it to the first chart read
    series = read_series(db, run.id, ["kl_mean"], max_buckets=8)
    assert series.level > 0
    whole = series.combined()
    assert whole["kl_mean__max"].max() == pytest.approx(0.01 * 399)
    assert whole["kl_mean__min"].min() == 0.0
    assert whole["n"].sum() == 400
    with db.begin() as conn:
        stored = conn.exec_driver_sql(f"SELECT COUNT(*) FROM step_rollups WHERE run_id = {run.id}")
        assert stored.scalar() > 0
