"""The CLI shell: db upgrade/current, runs, errors as one clean line."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner
from sqlalchemy import text

from monitor.cli import main
from monitor.cli.common import cell
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


#: A run name that tries to forge a row of `klmon runs`, tab-align, and drive the terminal.
FORGED = "ok\r\n  99  proj  forged-run  finished\x1b[2J\tx\u202egnp.exe"
FORGED_SHOWN = r"ok\r\n  99  proj  forged-run  finished\x1b[2J\tx\u202egnp.exe"

BUDGET_RULE = """
[[rule]]
name = "over-one"
detector = "budget"
severity = "critical"
for = 2
[rule.params]
value = 1.0
halflife_rows = 0.0
"""


def test_cli_tables_show_control_characters_escaped(tmp_path, monkeypatch) -> None:
    """A stored name or message with CR/LF/tab/ESC/bidi controls is shown escaped in every
    table: one line per row, nothing the terminal would act on."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    rules = tmp_path / "rules.toml"
    rules.write_text(BUDGET_RULE)
    for var in ("KLMON_SMTP_HOST", "KLMON_WEBHOOK_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KLMON_DB_URL", url)
    monkeypatch.setenv("KLMON_ALERT_RULES", str(rules))
    monkeypatch.setenv("KLMON_MAIL_FILE", str(tmp_path / "mail.mbox"))
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    db = Database.open(url)
    run = get_or_create_run(db, "proj", "placeholder")
    rows = [{"step": s, "wall_time": 10.0 * s, "kl_mean": v} for s, v in enumerate([2, 2, 2])]
    write_steps(db, run.id, rows)
    with db.begin() as conn:  # as stored by an older client that did not check names
        conn.execute(text("UPDATE runs SET name = :n WHERE id = :i"), {"n": FORGED, "i": run.id})
    db.dispose()

    def lines(*args: str) -> list[str]:
        result = runner.invoke(main, list(args))
        assert result.exit_code == 0, result.output
        assert not any(c in result.output for c in "\r\x1b\t\u202e")
        return result.output.splitlines()  # also splits on \x1c-\x1e, \x85, \u2028

    out = lines("runs")
    assert len(out) == 2 and FORGED_SHOWN[:28] in out[1]
    check = lines("alerts", "check")
    assert any(line.startswith("FIRING") and FORGED_SHOWN in line for line in check)
    out = lines("alerts", "list")
    assert len(out) == 2 and f"proj/{FORGED_SHOWN} " in out[1]
    assert len(lines("alerts", "outbox")) == 1
    silenced = runner.invoke(main, ["alerts", "silence", str(run.id), "--for", "1h",
                                    "--reason", "a\nb", "--by", "ops\x1b[0m"])  # fmt: skip
    assert silenced.exit_code == 0, silenced.output
    out = lines("alerts", "silences")
    assert len(out) == 1 and FORGED_SHOWN in out[0] and r"by ops\x1b[0m  a\nb" in out[0]


def test_cell_escapes_what_a_terminal_would_act_on() -> None:
    assert cell("a\x00b\x7f\x85\u2028\u2066c\udcff") == r"a\x00b\x7f\x85\u2028\u2066c\udcff"
    assert cell("plain ü 日本 \\n") == "plain ü 日本 \\n"  # printable text untouched
    assert cell(None) == "-" and cell(3) == "3"
