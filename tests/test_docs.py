"""The README documents every command and setting: each command and subcommand of the click
tree appears by its full name and its help has an example; every KLMON_* variable the code
reads is in the README; every `klmon ...` in a README code block is a real command; the two
commands on a fresh machine are the ones CI runs and the demo."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from monitor.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: Names that look like settings but are constants (columns klmon reserves in its exports).
NOT_SETTINGS = {"KLMON_RESERVED", "KLMON_EXPORT"}


def _commands(cmd: click.Command, path: tuple[str, ...]) -> list[tuple[str, click.Command]]:
    out = [(" ".join(path), cmd)]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name!r} but cannot load it"
            out += _commands(sub, (*path, name))
    return out


COMMANDS = _commands(main, ("klmon",))


def test_the_tree_is_walked() -> None:
    names = {name for name, _ in COMMANDS}
    assert {"klmon demo", "klmon report", "klmon alerts check", "klmon db upgrade"} <= names


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_command_documented_with_example(name: str, cmd: click.Command) -> None:
    assert f"`{name}" in README or f"{name} " in README, f"README does not mention `{name}`"
    assert "Example" in (cmd.help or ""), f"`{name} --help` has no example"


def _settings_read_by_the_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "monitor").rglob("*.py"):
        # a name ending in _ or followed by * is a family (KLMON_SMTP_*), listed one by one
        found |= set(re.findall(r"KLMON_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*])", path.read_text()))
    return found - NOT_SETTINGS


def test_every_setting_is_in_the_configuration_table() -> None:
    settings = _settings_read_by_the_code()
    assert {"KLMON_DB_URL", "KLMON_SMTP_HOST", "KLMON_DASHBOARD_TOKEN"} <= settings
    table = README.split("## Configuration", 1)[1]
    missing = sorted(s for s in settings if f"`{s}`" not in table)
    assert not missing, f"README's Configuration table lacks {missing}"


def _code_lines() -> list[str]:
    """The lines of the README's shell code blocks."""
    out: list[str] = []
    lang: str | None = None  # None: outside a block
    for line in README.splitlines():
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
        elif lang in ("bash", "sh", "console", ""):
            out.append(re.sub(r"(^|\s)#.*", "", line))  # without shell comments
    return out


def test_every_klmon_command_in_the_readme_exists() -> None:
    checked = 0
    for line in _code_lines():
        for m in re.finditer(r"(?:^|[\s/;&|(])klmon((?: [a-z][a-z-]*)+)", line):
            cmd: click.Command = main
            for word in m.group(1).split():
                if not isinstance(cmd, click.Group):
                    break  # an argument of a command (a run name, a path)
                sub = cmd.get_command(click.Context(cmd), word)
                assert sub is not None, f"README runs `klmon{m.group(1)}`: no command {word!r}"
                cmd = sub
            checked += 1
    assert checked >= 10


def test_the_two_commands_on_a_fresh_machine() -> None:
    section = README.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert blocks[0] == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/klmon demo"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert blocks[1] == ci, "the README's test command must be the one .ci/run runs verbatim"


def test_screenshot_is_there_and_shown() -> None:
    assert "](docs/screenshot.png)" in README
    assert (ROOT / "docs" / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ARCHITECTURE = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def test_every_path_the_architecture_map_names_exists() -> None:
    """docs/ARCHITECTURE.md is the map of the code: a path it names that no longer exists
    means the map went stale (move the module, update the map in the same commit)."""
    roots = "|".join(("monitor", "tests", "benchmarks", "migrations", "docs", "docker"))
    named = set(re.findall(rf"`((?:{roots})/[\w./-]*)`", ARCHITECTURE))
    assert len(named) >= 30, "the map names too few paths: did the pattern break?"
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_readme_points_to_the_architecture_map() -> None:
    assert "docs/ARCHITECTURE.md" in README
