"""`klmon alerts ...` end to end through click: rules, check, list, silence, ack, outbox."""

from __future__ import annotations

import json
import mailbox

import pytest
from click.testing import CliRunner
from support.alerts import add_steps, new_run

from monitor.cli import main
from monitor.cli.alerts_cmd import alerts_group
from monitor.store.database import Database

RULES = """
[[rule]]
name = "over-one"
detector = "budget"
severity = "critical"
for = 2
keep_firing_for = 1
[rule.params]
value = 1.0
halflife_rows = 0.0
"""


@pytest.fixture
def env(sqlite_url, tmp_path, monkeypatch):
    url = sqlite_url
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    for var in ("KLMON_SMTP_HOST", "KLMON_WEBHOOK_URL", "KLMON_ALERT_RULES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KLMON_DB_URL", url)
    monkeypatch.setenv("KLMON_ALERT_RULES", str(rules))
    monkeypatch.setenv("KLMON_MAIL_FILE", str(tmp_path / "mail.mbox"))
    monkeypatch.setenv("KLMON_DASHBOARD_URL", "http://dash.local")
    db = Database.open(url)
    yield db, tmp_path
    db.dispose()


def invoke(*args: str) -> object:
    result = CliRunner().invoke(main, ["alerts", *args])
    return result


def test_every_alerts_command_has_help_with_an_example() -> None:
    for name in alerts_group.commands:
        result = CliRunner().invoke(main, ["alerts", name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.output, name


def test_rules_prints_the_default_pack(monkeypatch) -> None:
    monkeypatch.delenv("KLMON_ALERT_RULES", raising=False)
    result = invoke("rules")
    assert result.exit_code == 0
    assert 'name = "kl-over-budget"' in result.output
    parsed = json.loads(invoke("rules", "--json").output)
    assert [r["name"] for r in parsed][:2] == ["kl-over-budget", "kl-spike"]


def test_rules_with_a_bad_file_fails_with_a_clear_message(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\ndetector = "budget"\nseverity = "loud"\n')
    result = invoke("rules", "--rules", str(bad))
    assert result.exit_code == 1
    assert f"Error: {bad}: rule 'x' (#1): field 'severity': 'loud' is not one of" in result.output


def test_check_list_silence_ack_outbox(env) -> None:
    db, tmp = env
    run = new_run(db, "ppo-a")
    quiet = new_run(db, "ppo-b")
    add_steps(db, run, 0, [0.5, 1.5, 1.7])
    add_steps(db, quiet, 0, [0.5, 0.6])

    out = invoke("check")
    assert out.exit_code == 0, out.output
    assert "evaluated 5 new steps of 2 runs" in out.output
    assert "FIRING    critical proj/ppo-a (run 1)  over-one  step 2  value 1.7" in out.output
    assert "1 queued, 1 sent, 0 failed, 0 pending" in out.output
    (mail,) = list(mailbox.mbox(str(tmp / "mail.mbox")))
    assert mail["Subject"] == "[klmon] CRITICAL: over-one on proj/ppo-a"

    again = json.loads(invoke("check", "--json").output)
    assert again["steps_evaluated"] == 0 and again["fired"] == []

    events = json.loads(invoke("list", "--json", "--state", "firing").output)
    assert [(e["run_name"], e["rule"], e["start_step"], e["fired_step"]) for e in events] == [
        ("ppo-a", "over-one", 1, 2)
    ]
    listing = invoke("list", "--run", "ppo-a").output
    assert "proj/ppo-a" in listing and "firing" in listing and "above its budget 1" in listing

    # silence the run's rule, let it resolve: no resolved notice
    s = invoke("silence", "ppo-a", "over-one", "--for", "2h", "--reason", "sweep", "--by", "bob")
    assert s.exit_code == 0 and "rule over-one" in s.output
    assert "sweep" in invoke("silences").output
    add_steps(db, run, 3, [0.2])
    out = json.loads(invoke("check", "--json", "--run", "ppo-a").output)
    assert [t["rule"] for t in out["resolved"]] == ["over-one"]
    assert out["notifications"]["enqueued"] == 0
    assert len(list(mailbox.mbox(str(tmp / "mail.mbox")))) == 1
    assert json.loads(invoke("list", "--json", "--run", "1").output)[0]["silenced"] is True

    event_id = events[0]["id"]
    ack = invoke("ack", str(event_id), "--by", "alice")
    assert ack.exit_code == 0 and "acknowledged by alice" in ack.output
    assert "[acked]" in invoke("list").output
    outbox = json.loads(invoke("outbox", "--json").output)
    assert [(o["status"], o["channel"]) for o in outbox] == [("sent", "email")]


def test_silence_refuses_unknown_rules_and_bad_durations(env) -> None:
    db, _ = env
    new_run(db, "ppo-a")
    bad_rule = invoke("silence", "ppo-a", "no-such-rule", "--for", "1h")
    assert bad_rule.exit_code == 1 and "no rule named 'no-such-rule'" in bad_rule.output
    bad_for = invoke("silence", "ppo-a", "--for", "soon")
    assert bad_for.exit_code == 1 and "duration 'soon'" in bad_for.output
    no_run = invoke("silence", "nope", "--for", "1h")
    assert no_run.exit_code == 1 and "no run named 'nope'" in no_run.output
    for text, said in (("99999999d", "too long: at most 3650d"), ("inf", "positive, finite")):
        result = invoke("silence", "ppo-a", "--for", text)
        assert result.exit_code == 1 and f"duration '{text}' " in result.output, result.output
        assert said in result.output and "Traceback" not in result.output
    assert invoke("silences", "--json").output.strip() == "[]"


def test_silences_lists_one_set_beyond_datetime_years(db_url: str, monkeypatch) -> None:
    """A silence stored far in the future (by any client) must not break the listing."""
    from monitor.store.alerts import silence

    db = Database.open(db_url)
    run = new_run(db, "ppo-a")
    silence(db, run, None, 1e13, by="bob", now=1.7e9)
    db.dispose()
    monkeypatch.setenv("KLMON_DB_URL", db_url)
    result = invoke("silences")
    assert result.exit_code == 0, result.output
    assert "Unix time 10000000000000" in result.output


def test_alerts_list_refuses_a_negative_limit(env) -> None:
    result = invoke("list", "--limit", "-5")
    assert result.exit_code == 2 and "'--limit'" in result.output


def test_check_json_keeps_stdout_clean_when_mail_is_printed(env, monkeypatch) -> None:
    db, _ = env
    monkeypatch.delenv("KLMON_MAIL_FILE")
    run = new_run(db)
    add_steps(db, run, 0, [2.0, 2.0])
    result = CliRunner().invoke(main, ["alerts", "check", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["notifications"]["sent"] == 1
    assert "Subject: [klmon] CRITICAL: over-one" in result.stderr


def test_alerts_list_shows_long_run_names_whole(env) -> None:
    db, _ = env
    run = new_run(db, "ppo-reward-hacking-beta0.01-seed3")
    add_steps(db, run, 0, [0.5, 1.5, 1.7])
    assert invoke("check").exit_code == 0
    out = invoke("list")
    assert out.exit_code == 0, out.output
    assert "proj/ppo-reward-hacking-beta0.01-seed3 " in out.output
