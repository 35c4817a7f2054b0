"""A click group that imports a subcommand's module only when that subcommand runs.

``klmon --help`` lists every command with its one-line help from a static table
(``LAZY_COMMANDS`` in ``monitor/cli/__init__.py``), so it imports none of them; ``klmon runs``
imports ``runs_cmd`` and what it uses, not pandas-heavy exporters or the alert engine.
``tests/test_cli_lazy.py`` checks the table against each command's real help.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from monitor.errors import KlmonError


class KlmonGroup(click.Group):
    """A group whose commands report klmon errors as one line, without a traceback, and whose
    subcommands named in ``lazy`` (name -> ("module:attribute", short help)) are imported on
    first use."""

    def __init__(
        self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, tuple[str, str]] = dict(lazy or {})

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KlmonError as exc:
            raise click.ClickException(str(exc)) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            target = self.lazy[cmd_name][0]
            module_name, attr = target.split(":")
            cmd = getattr(importlib.import_module(module_name), attr)
            if not isinstance(cmd, click.Command) or cmd.name != cmd_name:
                raise RuntimeError(f"{target} is not the click command {cmd_name!r}")
            self.add_command(cmd)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands section of ``--help``: loaded commands say their own short help,
        lazy ones the table's, so that listing them imports nothing."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                limit = formatter.width - 6 - len(name)
                rows.append((name, click.utils.make_default_short_help(self.lazy[name][1], limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
