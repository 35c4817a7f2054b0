"""The store's public face: ``monitor.store`` exports what the other layers use, loads it on
first use, and is the only package that talks to the database (no SQLAlchemy elsewhere)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import monitor.store

PACKAGE = Path(__file__).resolve().parents[1] / "monitor"


@pytest.mark.parametrize("name", monitor.store.__all__)
def test_every_exported_name_is_its_submodules_object(name: str) -> None:
    home = monitor.store._HOME[name]
    assert getattr(monitor.store, name) is getattr(
        importlib.import_module(f"monitor.store.{home}"), name
    )


def test_unknown_name_is_an_import_error() -> None:
    with pytest.raises(ImportError, match="no_such_thing"):
        exec("from monitor.store import no_such_thing", {})


def test_submodules_stay_reachable_through_the_package() -> None:
    from monitor.store import alerts, current_kl

    assert alerts.list_events is monitor.store.list_events
    assert callable(current_kl.current_kl)


def test_importing_the_database_handle_does_not_load_the_whole_store() -> None:
    """The CLI starts on ``monitor.store.database``: the facade must not drag pandas in."""
    code = (
        "import sys; from monitor.store import Database; "
        "print(sorted(m for m in ('pandas', 'monitor.store.series', 'monitor.store.alerts') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _sqlalchemy_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            found.add(node.module or "")
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in PACKAGE.rglob("*.py") if "store" not in p.relative_to(PACKAGE).parts[:1]),
    ids=lambda p: str(p.relative_to(PACKAGE.parent)),
)
def test_only_the_store_uses_sqlalchemy(path: Path) -> None:
    assert not _sqlalchemy_imports(path), f"{path.name}: SQL belongs in monitor/store"
