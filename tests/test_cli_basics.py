"""The CLI shell: db upgrade/current, runs, errors as one clean line."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from monitor.cli import main
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run
from monitor.store.steps import write_steps


def test_db_upgrade_then_runs_json(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    before = runner.invoke(main, ["runs", "--db", url])
    assert before.exit_code == 1
    assert "klmon db upgrade" in before.output
    up = runner.invoke(main, ["db", "upgrade", "--db", url])
    assert up.exit_code == 0, up.output
    assert "upgraded" in up.output
    cur = runner.invoke(main, ["db", "current", "--db", url])
    assert "up to date" in cur.output
    db = Database.open(url)
    run = get_or_create_run(db, "proj", "ppo")
    write_steps(db, run.id, [{"step": 4, "wall_time": 1.0, "kl_mean": 2.4}])
    out = runner.invoke(main, ["runs", "--json", "--db", url])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [
        {
            "id": run.id,
            "project": "proj",
            "name": "ppo",
            "status": "running",
            "n_steps": 1,
            "last_step": 4,
            "last_kl": 2.4,
            "kl_quantity": "kl_mean",
            "kl_unit": "nats per sequence",
            "kl_step": 4,
        }
    ]


def test_env_var_selects_database(tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("KLMON_DB_URL", url)
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0
    assert (tmp_path / "env.db").exists()


def test_python_dash_m_monitor_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "--version"], capture_output=True, text=True, check=True
    )
    assert "klmon" in result.stdout


def test_a_mistyped_sqlite_path_is_reported_and_not_created(tmp_path) -> None:
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(main, ["runs", "--db", f"sqlite:///{missing}"])
    assert result.exit_code == 1
    assert f"no database file at {missing}" in result.output
    assert not missing.exists()
