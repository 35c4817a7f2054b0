"""`klmon --help` lists every command without importing any of them, from a table whose help
matches each command's own; a command is imported when it runs; `klmon runs` reads through
the database driver alone."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from monitor.cli import LAZY_COMMANDS, main
from monitor.store.database import Database
from monitor.store.run_list import quick_run_summaries
from monitor.store.runs import find_run_by_name, get_or_create_run, run_summaries
from monitor.store.steps import write_steps

#: What `klmon --help` must not pay for: every command module and the heavy libraries.
HEAVY = ("pandas", "sqlalchemy", "dash", "plotly", "matplotlib", "alembic")


def _modules_loaded_by(args: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from monitor.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_the_table_matches_each_commands_own_help() -> None:
    ctx = click.Context(main)
    for name, (target, short_help) in LAZY_COMMANDS.items():
        cmd = main.get_command(ctx, name)
        assert cmd is not None, target
        assert cmd.name == name
        assert cmd.get_short_help_str(10**6) == short_help, f"update LAZY_COMMANDS[{name!r}]"


def test_every_command_module_is_in_the_table() -> None:
    from pathlib import Path

    cli_dir = Path(__file__).resolve().parents[1] / "monitor" / "cli"
    modules = {p.stem for p in cli_dir.glob("*_cmd*.py")}
    listed = {target.split(":")[0].rsplit(".", 1)[1] for target, _ in LAZY_COMMANDS.values()}
    assert modules == listed


def test_help_lists_every_command_and_imports_none() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in LAZY_COMMANDS:
        assert f"\n  {name} " in result.output
    loaded = _modules_loaded_by(["--help"])
    assert not {m for m in loaded if m.startswith("monitor.cli.") and m.endswith(("_cmd", "_cmds"))}
    assert not [m for m in HEAVY if m in loaded]


def test_a_command_runs_after_being_loaded_on_demand(tmp_path) -> None:
    result = CliRunner().invoke(main, ["db", "--help"])
    assert result.exit_code == 0, result.output
    assert "upgrade" in result.output
    loaded = _modules_loaded_by(["db", "--help"])
    assert "monitor.cli.db_cmds" in loaded
    assert "monitor.cli.alerts_cmd" not in loaded


def test_an_unknown_command_is_a_clean_error() -> None:
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "No such command 'nope'" in result.output


#: What `klmon runs` must not pay for: it reads two statements through the driver alone.
NOT_FOR_RUNS = (*HEAVY, "numpy", "monitor.store.database", "monitor.store.models")


def test_klmon_runs_reads_through_the_driver_alone(db: Database, db_url: str) -> None:
    """`klmon runs` answers without SQLAlchemy, numpy, pandas or Alembic, and gives what
    run_summaries through the Database gives (SQLite and PostgreSQL)."""
    run = get_or_create_run(db, "p", "r")
    write_steps(db, run.id, [{"step": s, "wall_time": 1e9 + s, "k3": s / 10} for s in range(3)])
    loaded = _modules_loaded_by(["runs", "--db", db_url])
    assert "monitor.store.run_list" in loaded
    assert not [m for m in NOT_FOR_RUNS if m in loaded]
    assert quick_run_summaries(db_url) == run_summaries(db)
    out = CliRunner().invoke(main, ["runs", "--json", "--db", db_url])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert [(r["name"], r["last_kl"], r["kl_quantity"]) for r in listed] == [("r", 0.2, "k3")]


def test_klmon_runs_leaves_the_unusual_to_the_database_path(tmp_path, sqlite_url: str) -> None:
    """A schema not at head, a missing file, a URL form the quick path does not parse: it
    declines, and the command gives the full path's answer or error."""
    from monitor.store.engine import make_engine
    from monitor.store.schema import upgrade

    old = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(old)
    upgrade(engine, "0005")
    engine.dispose()
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    for url in (old, missing):
        assert quick_run_summaries(url) is None
    out = CliRunner().invoke(main, ["runs", "--db", old])
    assert out.exit_code == 1 and "klmon db upgrade" in out.output
    out = CliRunner().invoke(main, ["runs", "--db", missing])
    assert out.exit_code == 1 and "no database file" in out.output
    assert not (tmp_path / "missing.db").exists()
    odd = sqlite_url.replace("sqlite:///", "sqlite+pysqlite:///") + "?timeout=5"
    assert quick_run_summaries(odd) is None
    out = CliRunner().invoke(main, ["runs", "--db", odd])
    assert out.exit_code == 0 and "no runs yet" in out.output


def test_the_quick_head_revision_is_alembics() -> None:
    from monitor.store.schema import head_revision, script_head

    assert script_head() == head_revision()


#: What `klmon import` of a clean table must not pay for: it binds tuples through the
#: driver, so neither the ORM (the alert engine's) nor Alembic (a new database is created from
#: the Core tables); nor pandas (numpy parses a CSV, pyarrow a JSONL or Parquet file).
NOT_FOR_IMPORT = ("sqlalchemy.orm", "monitor.store.models", "alembic", "pandas", "dash", "plotly")


def _table_file(folder, fmt: str):
    """A 50-step table (step, kl, loss with some missing) as CSV, JSONL or Parquet."""
    rows = [
        {"step": s, "kl": s / 100, "loss": None if s % 7 == 0 else 1 - s / 100} for s in range(50)
    ]
    log = folder / f"log.{fmt}"
    if fmt == "csv":
        cells = [[r["step"], r["kl"], "" if r["loss"] is None else r["loss"]] for r in rows]
        log.write_text("step,kl,loss\n" + "".join(",".join(map(str, c)) + "\n" for c in cells))
    elif fmt == "jsonl":
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), log)
    return log


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_klmon_import_loads_only_what_its_format_needs(
    tmp_path, db: Database, db_url: str, fmt: str
) -> None:
    if fmt == "jsonl":
        pytest.importorskip("pyarrow")  # without it, a JSONL file is parsed line by line
    log = _table_file(tmp_path, fmt)
    loaded = _modules_loaded_by(["import", str(log), "--run", fmt, "--db", db_url])
    assert "monitor.ingest.importers.importer" in loaded
    assert not [m for m in NOT_FOR_IMPORT if m in loaded]
    run = find_run_by_name(db, "imported", fmt)
    assert run is not None
    assert [(r["n_steps"], r["last_step"]) for r in run_summaries(db)] == [(50, 49)]


def test_klmon_import_creates_a_new_database_without_alembic(tmp_path) -> None:
    """A new SQLite file gets its schema from the Core tables, stamped at head."""
    from monitor.store.schema import head_revision

    url = f"sqlite:///{tmp_path / 'new.db'}"
    loaded = _modules_loaded_by(["import", str(_table_file(tmp_path, "csv")), "--db", url])
    assert not [m for m in NOT_FOR_IMPORT if m in loaded]
    db = Database.open(url)
    assert [r["n_steps"] for r in run_summaries(db)] == [50]
    with db.begin() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
            head_revision()
        )
