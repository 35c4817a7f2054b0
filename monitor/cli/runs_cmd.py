"""`klmon runs`: list runs, the first read command and the one scripts use."""

from __future__ import annotations

import click

from monitor.cli.common import cell, db_option, echo_records, json_value
from monitor.config import db_url
from monitor.store import run_summaries_at


@click.command("runs")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (for scripts).")
def runs_cmd(db: str | None, as_json: bool) -> None:
    """List runs: id, project, name, status, steps, last step and current KL with its unit.

    The current KL is the latest value of the best KL quantity the run has: klmon's kl_mean
    (nats per sequence), else a per-token estimator k3, k1 or k2 (nats per token), e.g. k3
    filled by TRL GRPO's `kl` on import ("k3 from kl").

    \b
    Example:
      klmon runs --json | jq '.[] | select(.status == "running")'
    """
    # plain records through the driver: listing runs imports neither SQLAlchemy nor pandas
    summaries = run_summaries_at(db_url(db))
    cols = [
        "id",
        "project",
        "name",
        "status",
        "n_steps",
        "last_step",
        "last_kl",
        "kl_quantity",
        "kl_unit",
        "kl_step",
    ]
    if as_json:
        summaries = [{c: json_value(r[c]) for c in cols} for r in summaries]
    if echo_records(summaries, as_json=as_json, empty="no runs yet"):
        return
    click.echo(
        f"{'id':>4}  {'project':<20} {'name':<28} {'status':<9} "
        f"{'steps':>7} {'last':>7} {'KL now':>10}  {'KL quantity (unit)'}"
    )
    lines = []
    for r in summaries:
        kl, what = "-", ""
        if r["last_kl"] is not None:
            kl = f"{r['last_kl']:.4g}"
            what = f"{r['kl_quantity']} ({r['kl_unit']})"
            if r["kl_step"] is not None and r["kl_step"] != r["last_step"]:
                what += f" at step {r['kl_step']}"
        last = "-" if r["last_step"] is None else str(r["last_step"])
        lines.append(
            f"{r['id']:>4}  {cell(r['project'])[:20]:<20} {cell(r['name'])[:28]:<28} "
            f"{cell(r['status']):<9} "
            f"{r['n_steps']:>7} {last:>7} {kl:>10}  {what}".rstrip()
        )
    click.echo("\n".join(lines))
