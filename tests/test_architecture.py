"""The import direction of DESIGN.md, checked on the source: core math depends on nothing of
ours; analytics never touches the store or the web stack; the store never imports the layers
above it; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monitor"

# module prefix -> prefixes it must never import
FORBIDDEN = {
    "monitor.divergence": ("monitor.", "torch", "pandas", "sqlalchemy", "dash"),
    "monitor.analytics": (
        "monitor.store",
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.ingest",
        "monitor.cli",
        "dash",
        "sqlalchemy",
    ),
    "monitor.store": (
        "monitor.ingest",
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.cli",
        "monitor.analytics",
        "dash",
    ),
}
ALLOWED = {"monitor.divergence": ("monitor.errors", "monitor._kernel")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_import_direction(path: Path) -> None:
    name = _module_name(path)
    imports = _imports(path)
    if name != "monitor.cli" and not name.startswith("monitor.cli.") and name != "monitor.__main__":
        assert not {i for i in imports if i == "monitor.cli" or i.startswith("monitor.cli.")}, (
            f"{name} imports the CLI"
        )
    for prefix, banned in FORBIDDEN.items():
        if name == prefix or name.startswith(prefix + "."):
            allowed = ALLOWED.get(prefix, ())
            bad = {
                i
                for i in imports
                if any(
                    i == b.rstrip(".") or i.startswith(b if b.endswith(".") else b + ".") or i == b
                    for b in banned
                )
                and i not in allowed
                and not (i == prefix or i.startswith(prefix + "."))  # its own modules
            }
            assert not bad, f"{name} must not import {sorted(bad)} (DESIGN.md import direction)"
