"""The import rules of docs/ARCHITECTURE.md, checked on the source: core math depends on
nothing of ours; analytics never touches the store or the web stack; the store never imports
the layers above it; ingest, integrations, alerts and report stay in their lanes; nothing
imports the CLI. Absolute and relative imports count alike, at module level or inside a
function; an import within one's own layer is always allowed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monitor"

# layer (a module or package) -> modules it must never import (a name covers its submodules)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "monitor.divergence": ("monitor", "torch", "pandas", "sqlalchemy", "dash"),
    "monitor.analytics": (
        "monitor.store",
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.ingest",
        "dash",
        "sqlalchemy",
    ),
    "monitor.store": (
        "monitor.ingest",
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.analytics",
        "monitor.report",
        "monitor.integrations",
        "monitor.demo",
        "monitor.simulate",
        "dash",
    ),
    # The charts are shared by the dashboard, the report and the alert emails: below all three.
    "monitor.charts": (
        "monitor.dashboard",
        "monitor.report",
        "monitor.alerts",
        "monitor.cli",
        "dash",
    ),
    "monitor.ingest": (
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.report",
        "monitor.integrations",
        "monitor.demo",
        "dash",
    ),
    "monitor.integrations": (
        "monitor.alerts",
        "monitor.dashboard",
        "monitor.report",
        "monitor.demo",
        "dash",
    ),
    "monitor.alerts": (
        "monitor.ingest",
        "monitor.dashboard",
        "monitor.report",
        "monitor.integrations",
        "monitor.demo",
        "dash",
    ),
    "monitor.report": (
        "monitor.dashboard",
        "monitor.ingest",
        "monitor.integrations",
        "monitor.demo",
    ),
}
# exceptions to a layer's bans
ALLOWED: dict[str, tuple[str, ...]] = {"monitor.divergence": ("monitor.errors", "monitor._kernel")}
# the only modules that may import the CLI
CLI = "monitor.cli"
CLI_IMPORTERS = ("monitor.cli", "monitor.__main__")


def _within(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or one of its submodules."""
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a relative ``from`` import in ``module`` names."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    up = node.level - 1
    if up >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = parts[: len(parts) - up]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, as absolute names.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule:
    ``from monitor import analytics``); relative imports are resolved against ``module``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node) if node.level else node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return found


def violations(module: str, imports: set[str]) -> list[str]:
    """The imports of ``module`` that break the rules, as sentences."""
    bad: list[str] = []
    if not any(_within(module, m) for m in CLI_IMPORTERS):
        bad += [f"{module} imports the CLI ({i})" for i in sorted(imports) if _within(i, CLI)]
    for layer, banned in FORBIDDEN.items():
        if not _within(module, layer):
            continue
        allowed = ALLOWED.get(layer, ())
        for i in sorted(imports):
            if _within(i, layer) or any(_within(i, a) for a in allowed):
                continue
            if any(_within(i, b) for b in banned):
                bad.append(f"{module} must not import {i} (docs/ARCHITECTURE.md, import rules)")
    return bad


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_import_direction(path: Path) -> None:
    name = _module_name(path)
    found = imports_of(
        path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py"
    )
    bad = violations(name, found)
    assert not bad, "\n".join(bad)


def test_every_layer_with_rules_exists() -> None:
    """A renamed or moved package must take its rules along, not silently drop them."""
    names = {_module_name(p) for p in SOURCES}
    for layer in FORBIDDEN:
        assert layer in names, f"FORBIDDEN names {layer}, which is not a module of monitor/"


@pytest.mark.parametrize(
    "module,is_package,source,expected",
    [
        ("monitor.analytics.trends", False, "from ..store import runs", "monitor.store.runs"),
        ("monitor.analytics", True, "from ..store.series import x", "monitor.store.series"),
        ("monitor.analytics", True, "from .trends import ewma", "monitor.analytics.trends"),
        ("monitor.alerts.rules", False, "from monitor import analytics", "monitor.analytics"),
        ("monitor.report.html", False, "from . import charts", "monitor.report.charts"),
    ],
)
def test_imports_are_resolved_to_absolute_names(
    module: str, is_package: bool, source: str, expected: str
) -> None:
    assert expected in imports_of(source, module, is_package=is_package)


@pytest.mark.parametrize(
    "module,source",
    [
        ("monitor.analytics.trends", "from ..store import runs"),
        ("monitor.analytics.detectors.kl", "from ...dashboard.figures import CHARTS"),
        ("monitor.store.series", "def f():\n    from ..alerts import engine\n"),
        ("monitor.divergence", "from monitor import __version__"),
        ("monitor.report.data", "from ..ingest.client import init"),
        ("monitor.integrations.trl", "from monitor.alerts import AlertEngine"),
        ("monitor.dashboard.app", "from ..cli import main"),
    ],
)
def test_a_forbidden_import_is_caught_however_it_is_written(module: str, source: str) -> None:
    assert violations(module, imports_of(source, module))


@pytest.mark.parametrize(
    "module,source",
    [
        ("monitor.divergence", "from monitor.errors import InvalidInput"),
        ("monitor.store.series", "from .tables import metadata"),
        ("monitor.store.steps", "from monitor.store import series"),
        ("monitor.cli.runs_cmd", "from .common import db_option"),
        ("monitor.report.html", "from monitor.store.runs import get_run"),
    ],
)
def test_allowed_imports_pass(module: str, source: str) -> None:
    assert violations(module, imports_of(source, module)) == []
