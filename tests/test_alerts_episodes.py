"""Episodes with the default pack: a blow-up is reported at its peak (escalation), a slow
decline hovering at a threshold is one episode and one email (hysteresis, cool-down)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from support.alerts import T0, Clock, ListSender, add_steps, new_run
from support.alerts import engine as alert_engine

from monitor.alerts import AlertEngine, AlertSettings, load_rules, parse_rules
from monitor.alerts.rules import RuleSet
from monitor.cli import main
from monitor.store.alerts import list_events
from monitor.store.steps import write_steps


def _engine(db, clock: Clock, sender: ListSender, rules: RuleSet | None = None) -> AlertEngine:
    return AlertEngine(
        db,
        rules if rules is not None else load_rules(None),
        settings=AlertSettings(nodata_after=3600.0),
        clock=clock,
        senders={"email": sender},
    )


def _write(db, run_id: int, start: int, **columns: list[float]) -> None:
    n = len(next(iter(columns.values())))
    rows = [
        {"step": start + i, "wall_time": T0 + 10.0 * (start + i)}
        | {k: float(v[i]) for k, v in columns.items()}
        for i in range(n)
    ]
    write_steps(db, run_id, rows)


def _grpo_k3(rows: int, seed: int = 0) -> np.ndarray:
    """A GRPO run's per-token KL rising from ~0 to 0.1 nats/token."""
    rise = 0.1 * (1 - np.exp(-(np.arange(rows) + 1) / 4.0))
    return np.clip(rise + np.random.default_rng(seed).normal(0.0, 0.004, rows), 1e-4, None)


def _default_rule(name: str) -> RuleSet:
    """One rule of the default pack, alone."""
    return RuleSet(tuple(r for r in load_rules(None) if r.name == name), "default pack")


def test_a_blow_up_after_the_opening_step_escalates_with_its_peak(db) -> None:
    """k3 ~0.1, then 0.372 at step 69 opens a spike episode, then 17.76 at step 70: a second
    notification headed "KL reached 17.8 at step 70"; the episode keeps its peak."""
    clock, sender = Clock(), ListSender()
    run = new_run(db, "grpo")
    engine = _engine(db, clock, sender, _default_rule("kl-spike"))
    _write(db, run, 0, k3=[*_grpo_k3(69), 0.372])
    engine.run_once()
    [fired] = sender.sent
    assert "kl-spike" in fired.subject and "reached" not in fired.subject
    assert "0.372 nats/token at step 69" in fired.payload["text"]

    clock.advance(10)
    _write(db, run, 70, k3=[17.76])
    engine.run_once()
    [escalation] = sender.sent[1:]
    assert "KL reached 17.8 at step 70" in escalation.subject
    assert escalation.payload["text"].startswith("KL reached 17.8 at step 70")

    clock.advance(10)
    _write(db, run, 71, k3=[20.0])  # not another 3x: no third notification
    engine.run_once()
    assert len(sender.sent) == 2

    result = CliRunner().invoke(main, ["alerts", "list", "--json", "--db", db.url])
    [spike] = [e for e in json.loads(result.output) if e["rule"] == "kl-spike"]
    assert spike["peak_value"] == 20.0 and spike["peak_step"] == 71
    assert spike["fired_step"] == 69


def test_a_blow_up_seen_in_one_pass_is_announced_at_its_peak(db) -> None:
    """An import evaluated at once: the firing notice itself gives the peak, once."""
    sender = ListSender()
    run = new_run(db, "grpo")
    _write(db, run, 0, k3=[*_grpo_k3(69), 0.372, 17.76, 0.1, 0.1])
    _engine(db, Clock(), sender, _default_rule("kl-spike")).run_once()
    spike = sender.sent
    assert len(spike) == 1
    assert "KL reached 17.8 at step 70" in spike[0].subject
    assert "peak: KL reached 17.8 at step 70" in spike[0].payload["text"]
    assert "17.8 at step 70" in spike[0].payload["html"]


def _slow_entropy_decline(rows: int = 600) -> np.ndarray:
    """Entropy 2.0 for 40 rows, then a slow decline to ~0.85 with a wobble that crosses
    half the warm-up (1.0) several times before staying below it."""
    i = np.arange(rows)
    trend = np.where(i < 40, 2.0, 2.0 - 1.15 * (i - 40) / (rows - 40))
    wobble = 0.1 * np.sin(2 * np.pi * i / 40.0)
    return trend + wobble + np.random.default_rng(3).normal(0.0, 0.01, rows)


def _entropy_episodes(db, rules: RuleSet | None) -> tuple[list, list]:
    sender = ListSender()
    run = new_run(db, f"decline-{rules is None}")
    entropy = _slow_entropy_decline()
    _write(db, run, 0, entropy_mean=list(entropy), k3=[0.01] * len(entropy))
    _engine(db, Clock(), sender, rules).run_once()
    events = list_events(db, run_id=run, rule="entropy-collapse", limit=None)
    mails = [m for m in sender.sent if "entropy-collapse" in m.subject]
    return events, mails


NO_HYSTERESIS = """
[[rule]]
name = "entropy-collapse"
detector = "entropy_collapse"
severity = "critical"
for = 3
keep_firing_for = 10
[rule.params]
clear_ratio = 0.5
"""


def test_a_slow_entropy_decline_is_one_episode_and_one_email(db) -> None:
    events, mails = _entropy_episodes(db, None)
    assert len(events) == 1 and len(mails) == 1
    # without hysteresis or cool-down the same series flaps (the test can fail)
    flapping, _ = _entropy_episodes(db, parse_rules(NO_HYSTERESIS))
    assert len(flapping) > 1


COOLDOWN = """
[[rule]]
name = "high-kl"
detector = "threshold"
severity = "warning"
for = 1
keep_firing_for = 2
cooldown = 5
[rule.params]
level = 1.0
"""


def test_a_rule_cannot_re_fire_within_its_cool_down(db) -> None:
    """Fire at 2, resolved at 4 (two clear rows); the return at 7 is inside the 5-row
    cool-down, the one at 14 is not."""
    sender = ListSender()
    run = new_run(db, "cool")
    kl = [0.5, 0.5, 2, 0.5, 0.5, 0.5, 0.5, 2, 2, 0.5, 0.5, 0.5, 0.5, 0.5, 2, 0.5]
    add_steps(db, run, 0, kl)
    alert_engine(db, Clock(), sender, COOLDOWN).run_once()
    events = list_events(db, run_id=run, limit=None).sort_values("start_step")
    assert events["fired_step"].tolist() == [2, 14]
    assert events["end_step"].iloc[0] == 4
