"""The current KL of a run: the best KL quantity it has (klmon's kl_mean, else k3, k1, k2),
its latest value and its unit, for `klmon runs` and the Runs page; real imported GRPO runs
(whose only KL is TRL's `kl`, stored as k3) get one too."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from support.realdata_path import REALDATA

from monitor.cli import main
from monitor.ingest.importers import import_path
from monitor.store.current_kl import (
    PER_SEQUENCE,
    PER_TOKEN,
    KLQuantity,
    best_kl,
    current_kl,
    kl_columns_present,
)
from monitor.store.database import Database
from monitor.store.metric_info import MetricInfo, write_metric_info
from monitor.store.runs import get_or_create_run, list_runs
from monitor.store.steps import write_steps

needs_realdata = pytest.mark.skipif(
    not (REALDATA / "INDEX.md").is_file(),
    reason=f"real training logs not found at {REALDATA} (set KLMON_REALDATA to their folder)",
)


def _write(db: Database, run_id: int, steps, **cols) -> None:
    """Rows at ``steps``; each column a function of the step (None: no value there)."""
    rows = []
    for s in steps:
        row = {"step": s, "wall_time": 1000.0 + s}
        for c, fn in cols.items():
            v = fn(s)
            if v is not None:
                row[c] = v
        rows.append(row)
    write_steps(db, run_id, rows)


def test_kl_mean_is_preferred_and_said_per_sequence(db: Database) -> None:
    run = get_or_create_run(db, "p", "live")
    _write(db, run.id, range(40), kl_mean=lambda s: 0.1 * s, k3=lambda s: 0.001 * s)
    now = current_kl(db, run.id)
    assert now is not None
    assert (now.quantity.column, now.quantity.unit, now.step) == ("kl_mean", PER_SEQUENCE, 39)
    assert now.value == pytest.approx(3.9)
    assert now.quantity.label() == "kl_mean, nats/seq"
    assert kl_columns_present(db, run.id) == ["kl_mean", "k3"]


def test_per_token_estimator_when_there_is_no_kl_mean(db: Database) -> None:
    run = get_or_create_run(db, "p", "verl")
    # 300 steps: read from the rollups; k1 only on every 4th step and not on the last ones
    _write(db, run.id, range(300), k1=lambda s: s / 1000 if s % 4 == 0 and s < 290 else None)
    write_metric_info(
        db, run.id, [MetricInfo("critic/kl", "verl", "k1", "k1", "seq-mean", "veRL critic KL")]
    )
    now = current_kl(db, run.id)
    assert now is not None
    assert now.quantity == KLQuantity("k1", "critic/kl", "k1", "seq-mean")
    assert now.quantity.unit == PER_TOKEN
    assert now.quantity.name == "k1 from critic/kl"
    assert (now.step, now.value) == (288, pytest.approx(0.288))


def test_a_run_without_kl_has_none(db: Database) -> None:
    run = get_or_create_run(db, "p", "sft")
    _write(db, run.id, range(5), reward_mean=lambda s: 1.0)
    assert best_kl(db, run.id) is None and current_kl(db, run.id) is None
    get_or_create_run(db, "p", "empty")
    df = list_runs(db).set_index("name")
    for name in ("sft", "empty"):
        assert math.isnan(df.loc[name, "last_kl"]) and df.loc[name, "kl_unit"] is None


@needs_realdata
def test_imported_grpo_runs_list_their_k3_with_its_unit(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade", "--db", url]).exit_code == 0
    db = Database.open(url)
    expected = {}
    for f in ("gemma3_grpo_abdo", "chaos_economy_grpo"):
        path = REALDATA / f"{f}.trainer_state.json"
        import_path(db, path)
        logs = [r for r in json.loads(path.read_text())["log_history"] if "kl" in r]
        expected[f] = (logs[-1]["step"], logs[-1]["kl"])
    db.dispose()
    out = runner.invoke(main, ["runs", "--json", "--db", url])
    assert out.exit_code == 0, out.output
    got = {r["name"]: r for r in json.loads(out.output)}
    for f, (step, kl) in expected.items():
        r = got[f]
        assert (r["kl_quantity"], r["kl_unit"], r["kl_step"]) == ("k3 from kl", PER_TOKEN, step)
        assert r["last_kl"] == pytest.approx(kl)
    table = runner.invoke(main, ["runs", "--db", url])
    assert table.exit_code == 0
    line = next(ln for ln in table.output.splitlines() if "gemma3_grpo_abdo" in ln)
    assert f"{expected['gemma3_grpo_abdo'][1]:.4g}" in line
    assert "k3 from kl (nats per token)" in line
