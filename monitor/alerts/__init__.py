"""Alerts: rules as data, an engine that moves each (run, rule) through pending -> firing
-> resolved with its state stored, and notifications (email, webhook) through an outbox.

Example::

    from monitor.alerts import AlertEngine, load_rules
    engine = AlertEngine(db, load_rules())       # the packaged default pack
    report = engine.run_once()                   # evaluate, notify, deliver
    engine.watch(interval=2.0)                   # the daemon (`klmon alerts watch`)
"""

from monitor.alerts.engine import AlertEngine, PassReport, parse_duration
from monitor.alerts.notify import NotifyError
from monitor.alerts.rules import (
    SEVERITIES,
    Rule,
    RuleSet,
    default_rules_text,
    load_rules,
    parse_rules,
)
from monitor.alerts.settings import AlertSettings, SmtpSettings
from monitor.alerts.state import Transition

__all__ = [
    "SEVERITIES",
    "AlertEngine",
    "AlertSettings",
    "NotifyError",
    "PassReport",
    "Rule",
    "RuleSet",
    "SmtpSettings",
    "Transition",
    "default_rules_text",
    "load_rules",
    "parse_duration",
    "parse_rules",
]
