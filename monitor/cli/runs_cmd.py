"""`klmon runs`: list runs, the first read command and the one scripts use."""

from __future__ import annotations

import json
import math

import click

from monitor.cli.common import cell, db_option, open_db
from monitor.store.runs import list_runs


@click.command("runs")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (for scripts).")
def runs_cmd(db: str | None, as_json: bool) -> None:
    """List runs: id, project, name, status, steps, last step and last KL.

    \b
    Example:
      klmon runs --json | jq '.[] | select(.status == "running")'
    """
    df = list_runs(open_db(db))
    cols = ["id", "project", "name", "status", "n_steps", "last_step", "last_kl"]
    records = [{c: _plain(rec[c]) for c in cols} for rec in df[cols].to_dict(orient="records")]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("no runs yet")
        return
    click.echo(
        f"{'id':>4}  {'project':<20} {'name':<28} {'status':<9} "
        f"{'steps':>7} {'last':>7} {'last KL':>10}"
    )
    for r in records:
        kl = "-" if r["last_kl"] is None else f"{r['last_kl']:.4g}"
        last = "-" if r["last_step"] is None else str(r["last_step"])
        click.echo(
            f"{r['id']:>4}  {cell(r['project'])[:20]:<20} {cell(r['name'])[:28]:<28} "
            f"{cell(r['status']):<9} "
            f"{r['n_steps']:>7} {last:>7} {kl:>10}"
        )


def _plain(value: object) -> object:
    """numpy/pandas scalars and missing values as JSON-friendly Python values."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
