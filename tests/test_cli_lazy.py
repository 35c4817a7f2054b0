"""`klmon --help` lists every command without importing any of them, from a table whose help
matches each command's own; a command is imported when it runs."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from monitor.cli import LAZY_COMMANDS, main

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


def test_klmon_runs_imports_neither_pandas_nor_alembic(sqlite_url: str) -> None:
    loaded = _modules_loaded_by(["runs", "--db", sqlite_url])
    assert "monitor.store.runs" in loaded
    assert not [m for m in ("pandas", "alembic", "dash", "plotly", "matplotlib") if m in loaded]


def test_the_quick_head_revision_is_alembics() -> None:
    from monitor.store.schema import _script_head, head_revision

    assert _script_head() == head_revision()
