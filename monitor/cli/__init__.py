"""The ``klmon`` command line: a thin shell over the library. Each command opens the
database, calls one library function and turns klmon errors into clean messages.

Commands are imported when they run (``KlmonGroup``, ``monitor/cli/lazy.py``): ``klmon --help``
reads their one-line help from ``LAZY_COMMANDS`` and imports none of them."""

from __future__ import annotations

import click

from monitor import __version__
from monitor.cli.lazy import KlmonGroup

#: name -> ("module:click command", its short help as ``--help`` shows it); a test checks
#: the help against each command's own.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "alerts": (
        "monitor.cli.alerts_cmd:alerts_group",
        "Alert rules, evaluation and notifications (email, webhook).",
    ),
    "db": (
        "monitor.cli.db_cmds:db_group",
        "Manage the database: its schema and the space samples take.",
    ),
    "demo": (
        "monitor.cli.demo_cmd:demo_cmd",
        "Build a demo database of simulated RLHF runs (healthy, reward hacking, reference "
        "mismatch with negative KL, a KL spike, and one still training), run the alert engine "
        "over it, and serve the dashboard on 127.0.0.1 while the live run keeps logging.",
    ),
    "export": (
        "monitor.cli.import_cmd:export_cmd",
        "Write a run's step table: every quantity, every extra metric, one row per step.",
    ),
    "import": (
        "monitor.cli.import_cmd:import_cmd",
        "Import an existing training log as a finished run, idempotently.",
    ),
    "report": (
        "monitor.cli.report_cmd:report_cmd",
        "Write a post-mortem report: the compare charts, the alert timeline, the worst samples "
        "with their tokens coloured by log p - log q, annotations, and each run's config side "
        "by side with the differences highlighted.",
    ),
    "runs": (
        "monitor.cli.runs_cmd:runs_cmd",
        "List runs: id, project, name, status, steps, last step and current KL with its unit.",
    ),
    "serve": (
        "monitor.cli.serve_cmd:serve_cmd",
        "Serve the dashboard: runs, compare, run detail down to the tokens, alerts.",
    ),
    "sync": (
        "monitor.cli.sync_cmd:sync_cmd",
        "Replay spool files of training processes that died before the database had all "
        "their steps.",
    ),
}

__all__ = ["LAZY_COMMANDS", "KlmonGroup", "main"]


@click.group(cls=KlmonGroup, lazy=LAZY_COMMANDS)
@click.version_option(__version__, prog_name="klmon")
def main() -> None:
    """klmon: watch the KL divergence between an RLHF policy and its frozen reference.

    \b
    Example:
      klmon db upgrade && klmon runs
    """
