"""`klmon alerts ...`: rules, one evaluation pass, the watch daemon, events, silences."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import click

from monitor.cli.common import cell, db_option, echo_records, json_records, json_value, open_db
from monitor.errors import ConfigError, InvalidInput
from monitor.formats import UTC_COMPACT, number_text, utc_text


def _rules_option(func: Any) -> Any:
    return click.option(
        "--rules",
        "rules_path",
        metavar="FILE",
        default=None,
        help="Rules file (TOML; default: $KLMON_ALERT_RULES or the packaged default pack).",
    )(func)


def _load(rules_path: str | None) -> tuple[Any, Any]:
    from monitor.alerts import AlertSettings, load_rules

    settings = AlertSettings.from_env()
    return settings, load_rules(rules_path or settings.rules_path)


def _when(ts: Any) -> str:
    return utc_text(ts, UTC_COMPACT)


def _num(x: Any) -> str:
    return number_text(json_value(x))


@click.group("alerts")
def alerts_group() -> None:
    """Alert rules, evaluation and notifications (email, webhook).

    \b
    Example:
      klmon alerts rules > my_rules.toml
      klmon alerts check --rules my_rules.toml
      klmon alerts watch --interval 2s
    """


@alerts_group.command("rules")
@_rules_option
@click.option("--json", "as_json", is_flag=True, help="Print the parsed rules as JSON.")
def rules_cmd(rules_path: str | None, as_json: bool) -> None:
    """Validate and print the rules in use (the packaged default pack unless --rules).

    \b
    Example:
      klmon alerts rules > my_rules.toml    # start from the default pack
      klmon alerts rules --rules my_rules.toml --json
    """
    _, rules = _load(rules_path)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "detector": r.detector,
                        "severity": r.severity,
                        "for": r.for_steps,
                        "keep_firing_for": r.keep_firing_for,
                        "cooldown": r.cooldown,
                        "escalate_factor": r.escalate_factor,
                        "params": dict(r.params),
                        "description": r.description,
                        "enabled": r.enabled,
                    }
                    for r in rules
                ],
                indent=2,
            )
        )
        return
    click.echo(rules.text, nl=False)
    click.echo(f"# {len(rules)} rules from {rules.source}: valid", err=True)


def _engine(db: str | None, rules_path: str | None, *, stdout: Any = None) -> Any:
    from monitor.alerts import AlertEngine
    from monitor.alerts.notify import senders_for

    settings, rules = _load(rules_path)
    database = open_db(db)
    senders = senders_for(settings, stdout=stdout)
    return AlertEngine(database, rules, settings=settings, senders=senders)


def _print_transitions(report: Any) -> None:
    for t in report.transitions:
        if t.to_state not in ("firing", "resolved", "nodata", "error"):
            continue
        run = report.run_labels.get(t.run_id, str(t.run_id))
        value = "" if t.value is None else f"  value {_num(t.value)}"
        step = "-" if t.step is None else str(t.step)
        click.echo(
            f"{t.to_state.upper():<9} {t.severity:<8} {cell(run)} (run {t.run_id})  {t.rule}  "
            f"step {step}{value}  {cell(t.message)}"
        )


@alerts_group.command("check")
@db_option
@_rules_option
@click.option("--run", "run_ref", metavar="RUN", default=None, help="Only this run (id or name).")
@click.option("--json", "as_json", is_flag=True, help="Print the pass as JSON (for scripts).")
def check_cmd(db: str | None, rules_path: str | None, run_ref: str | None, as_json: bool) -> None:
    """Evaluate every step not yet evaluated (finished and imported runs included), send
    what is owed, and print what fired and resolved.

    \b
    Example:
      klmon alerts check --run ppo-beta0.05 --json | jq '.fired'
    """
    from monitor.store import resolve_run

    # the transitions are printed below; the engine's own log is for the daemon
    logging.getLogger("monitor.alerts").setLevel(logging.ERROR)
    engine = _engine(db, rules_path, stdout=sys.stderr if as_json else None)
    run_ids = None
    if run_ref is not None:
        run_ids = [resolve_run(engine.db, run_ref).id]
    report = engine.run_once(run_ids)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=json_value))
    else:
        click.echo(f"evaluated {report.steps_evaluated} new steps of {report.runs_evaluated} runs")
        _print_transitions(report)
        if not report.fired and not report.resolved:
            click.echo("nothing fired or resolved")
        click.echo(
            f"notifications: {report.notifications_enqueued} queued, {report.sent} sent, "
            f"{report.failed} failed, {report.pending} pending"
        )
    for err in report.errors:
        click.echo(f"error: {err}", err=True)
    if report.errors:
        sys.exit(1)


@alerts_group.command("watch")
@db_option
@_rules_option
@click.option(
    "--interval",
    default="2s",
    show_default=True,
    help="Time between evaluation passes (e.g. 500ms, 2s, 1m).",
)
def watch_cmd(db: str | None, rules_path: str | None, interval: str) -> None:
    """Run the alert daemon: evaluate new steps every --interval, send notifications as
    soon as they are due (an alert email goes out within seconds of its step landing).

    Stops cleanly on Ctrl-C or SIGTERM.

    \b
    Example:
      KLMON_SMTP_HOST=smtp.example.com KLMON_ALERT_TO=oncall@example.com \\
        klmon alerts watch --interval 2s
    """
    from monitor.alerts import parse_duration

    seconds = parse_duration(interval)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = _engine(db, rules_path)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        click.echo(f"klmon alerts watch: signal {signum}, stopping", err=True)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    channels = "; ".join(s.describe() for s in engine.senders.values())
    st = engine.settings
    click.echo(
        f"klmon alerts watch: {engine.db.safe_url}, {len(engine.rules.enabled)} rules from "
        f"{engine.rules.source}, every {seconds:g} s; {channels}; {st.delivery_workers} "
        f"senders per channel, {st.delivery_deadline:g} s deadline per delivery",
        err=True,
    )

    try:
        engine.watch(seconds, stop=stop)  # transitions are logged as they happen
    except KeyboardInterrupt:
        stop.set()
    click.echo("klmon alerts watch: stopped", err=True)


@alerts_group.command("list")
@db_option
@click.option(
    "--state",
    type=click.Choice(["pending", "firing", "resolved", "open"]),
    default=None,
    help="Only episodes in this state (open: pending or firing).",
)
@click.option("--run", "run_ref", metavar="RUN", default=None, help="Only this run (id or name).")
@click.option("--rule", default=None, help="Only this rule.")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="At most this many, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (for scripts).")
def list_cmd(
    db: str | None,
    state: str | None,
    run_ref: str | None,
    rule: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List alert episodes: run, rule, severity, state, start and end step, value, message.

    \b
    Example:
      klmon alerts list --state firing
      klmon alerts list --run 7 --json | jq '.[].message'
    """
    from monitor.store import list_events, resolve_run

    database = open_db(db)
    run_id = resolve_run(database, run_ref).id if run_ref is not None else None
    df = list_events(database, run_id=run_id, state=state, rule=rule, limit=limit)
    records = json_records(df)
    if echo_records(records, as_json=as_json, empty="no alert events"):
        return
    runs = [cell(f"{r['project']}/{r['run_name']}") for r in records]
    width = max(3, *(len(run) for run in runs))  # never cut: run names differ at the end
    click.echo(
        f"{'id':>5}  {'run':<{width}} {'rule':<20} {'severity':<8} {'state':<9} "
        f"{'start':>7} {'fired':>7} {'end':>7} {'value':>9}  message"
    )
    for r, run in zip(records, runs, strict=True):
        state_txt = r["state"]
        if r["rule_state"] in ("nodata", "error"):
            state_txt += f"/{r['rule_state']}"
        flags = (" [acked]" if r["acknowledged_by"] else "") + (
            " [silenced]" if r["silenced"] else ""
        )
        click.echo(
            f"{r['id']:>5}  {run:<{width}} {cell(r['rule'])[:20]:<20} {cell(r['severity']):<8} "
            f"{state_txt:<9} {_step(r['start_step'])} {_step(r['fired_step'])} "
            f"{_step(r['end_step'])} {_num(r['value']):>9}  {cell(r['message'])}{flags}"
        )


def _step(value: Any) -> str:
    return f"{'-' if value is None else value:>7}"


@alerts_group.command("silence")
@db_option
@_rules_option
@click.argument("run_ref", metavar="RUN")
@click.argument("rule", required=False)
@click.option("--for", "duration", required=True, help="How long, e.g. 30m, 2h, 1d.")
@click.option("--reason", default=None, help="Why (shown in `klmon alerts silences`).")
@click.option("--by", default=None, help="Who silences (default: $USER).")
def silence_cmd(
    db: str | None,
    rules_path: str | None,
    run_ref: str,
    rule: str | None,
    duration: str,
    reason: str | None,
    by: str | None,
) -> None:
    """Send no notification for RUN (only RULE if given) for a while; states are still
    tracked, and an alert still firing when the silence ends is sent then.

    \b
    Example:
      klmon alerts silence ppo-beta0.05 kl-over-budget --for 2h --reason "lr sweep"
    """
    import getpass

    from monitor.alerts import parse_duration
    from monitor.store import resolve_run, silence

    seconds = parse_duration(duration)
    if rule is not None:
        _, rules = _load(rules_path)
        if rules.get(rule) is None:
            known = ", ".join(r.name for r in rules)
            raise ConfigError(f"no rule named {rule!r} in {rules.source} (rules: {known})")
    database = open_db(db)
    run = resolve_run(database, run_ref)
    now = time.time()
    try:
        who = by or getpass.getuser()
    except Exception:
        who = None
    s = silence(database, run.id, rule, now + seconds, by=who, reason=reason, now=now)
    what = f"rule {rule}" if rule else "every rule"
    click.echo(
        f"silence {s.id}: {run.project}/{run.name} (run {run.id}), {what}, until {_when(s.until)}"
    )


@alerts_group.command("unsilence")
@db_option
@click.argument("silence_id", type=int)
def unsilence_cmd(db: str | None, silence_id: int) -> None:
    """End a silence now.

    \b
    Example:
      klmon alerts unsilence 3
    """
    from monitor.store import unsilence

    s = unsilence(open_db(db), silence_id)
    click.echo(f"silence {s.id} ended")


@alerts_group.command("silences")
@db_option
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def silences_cmd(db: str | None, show_all: bool, as_json: bool) -> None:
    """List silences (active ones unless --all).

    \b
    Example:
      klmon alerts silences --all
    """
    from monitor.store import list_silences

    df = list_silences(open_db(db), active_only=not show_all)
    records = json_records(df)
    if echo_records(
        records, as_json=as_json, empty="no silences" if show_all else "no active silences"
    ):
        return
    for r in records:
        click.echo(
            f"{r['id']:>4}  {cell(r['project'])}/{cell(r['run_name'])} (run {r['run_id']})  "
            f"{cell(r['rule'] or '(every rule)')}  until {_when(r['until'])}"
            f"{'' if r['active'] else ' (expired)'}  by {cell(r['created_by'] or '-')}"
            + (f"  {cell(r['reason'])}" if r["reason"] else "")
        )


@alerts_group.command("ack")
@db_option
@click.argument("event_id", type=int)
@click.option("--by", default=None, help="Who acknowledges (default: $USER).")
def ack_cmd(db: str | None, event_id: int, by: str | None) -> None:
    """Acknowledge an alert episode (someone is on it).

    \b
    Example:
      klmon alerts ack 12 --by alice
    """
    import getpass

    from monitor.store import acknowledge_event

    who = by
    if who is None:
        try:
            who = getpass.getuser()
        except Exception as exc:
            raise InvalidInput("--by is required (no user name in the environment)") from exc
    ev = acknowledge_event(open_db(db), event_id, who)
    click.echo(f"event {ev.id} ({ev.rule}, {ev.state}) acknowledged by {ev.acknowledged_by}")


@alerts_group.command("outbox")
@db_option
@click.option(
    "--status", type=click.Choice(["pending", "sent", "dead"]), default=None, help="Filter."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def outbox_cmd(db: str | None, status: str | None, as_json: bool) -> None:
    """Show notifications waiting to be sent, sent, or given up on, with the last error.

    \b
    Example:
      klmon alerts outbox --status pending
    """
    from monitor.store import list_notifications

    df = list_notifications(open_db(db), status=status)
    records = json_records(df)
    if echo_records(records, as_json=as_json, empty="outbox is empty"):
        return
    for r in records:
        extra = f"  last error: {cell(r['last_error'])}" if r["last_error"] else ""
        if r["status"] == "pending" and r["claimed_by"]:
            extra += f"  (claimed by {cell(r['claimed_by'])})"
        click.echo(
            f"{r['id']:>5}  {r['status']:<7} {r['channel']:<7} attempts {r['attempts']}  "
            f"{cell(r['subject'])}{extra}"
        )
