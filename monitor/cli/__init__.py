"""The ``klmon`` command line: a thin shell over the library. Each command opens the
database, calls one library function and turns klmon errors into clean messages."""

from __future__ import annotations

from typing import Any

import click

from monitor import __version__
from monitor.cli.alerts_cmd import alerts_group
from monitor.cli.db_cmds import db_group
from monitor.cli.demo_cmd import demo_cmd
from monitor.cli.import_cmd import export_cmd, import_cmd
from monitor.cli.report_cmd import report_cmd
from monitor.cli.runs_cmd import runs_cmd
from monitor.cli.serve_cmd import serve_cmd
from monitor.cli.sync_cmd import sync_cmd
from monitor.errors import KlmonError


class KlmonGroup(click.Group):
    """A group whose commands report klmon errors as one line, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KlmonError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=KlmonGroup)
@click.version_option(__version__, prog_name="klmon")
def main() -> None:
    """klmon: watch the KL divergence between an RLHF policy and its frozen reference.

    \b
    Example:
      klmon db upgrade && klmon runs
    """


main.add_command(db_group)
main.add_command(runs_cmd)
main.add_command(alerts_group)
main.add_command(sync_cmd)
main.add_command(import_cmd)
main.add_command(export_cmd)
main.add_command(demo_cmd)
main.add_command(report_cmd)
main.add_command(serve_cmd)
