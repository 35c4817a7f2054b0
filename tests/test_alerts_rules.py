"""Rules files: the packaged default pack, and clear errors that name the rule and field."""

from __future__ import annotations

import tomllib

import pytest

from monitor.alerts import SEVERITIES, default_rules_text, load_rules, parse_rules
from monitor.analytics import DETECTORS
from monitor.errors import ConfigError


def test_default_pack_is_valid_and_covers_every_detector() -> None:
    rules = load_rules()
    assert {r.detector for r in rules} == set(DETECTORS)
    assert len({r.name for r in rules}) == len(rules)
    for r in rules:
        assert r.severity in SEVERITIES and r.description and r.enabled
    budget = rules.get("kl-over-budget")
    assert budget is not None and budget.severity == "critical" and budget.for_steps == 3
    assert tomllib.loads(default_rules_text())["rule"][0]["name"] == "kl-over-budget"
    assert rules.get("run-stalled").time_based


def test_rules_file_round_trip(tmp_path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[[rule]]
name = "tight-budget"
detector = "budget"
severity = "info"
for = 2
keep_firing_for = 4
enabled = false
[rule.params]
value = 0.5
halflife_rows = 0.0
"""
    )
    (rule,) = load_rules(path)
    assert (rule.name, rule.severity, rule.for_steps, rule.keep_firing_for) == (
        "tight-budget",
        "info",
        2,
        4,
    )
    assert rule.params == {"value": 0.5, "halflife_rows": 0.0} and not rule.enabled


def rule(body: str, name: str = "r1") -> str:
    return f'[[rule]]\nname = "{name}"\n{body}\n'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (rule('detector = "budgett"'), r"rule 'r1' \(#1\): field 'detector': unknown detector "
         r"'budgett' \(known: budget, concentration"),
        (rule('detector = "budget"\nseverity = "high"'),
         r"rule 'r1' \(#1\): field 'severity': 'high' is not one of info, warning, critical"),
        (rule('detector = "budget"\nfor = "3"'),
         r"rule 'r1' \(#1\): field 'for': expected a whole number of steps, got '3'"),
        (rule('detector = "budget"\nfor = true'), r"field 'for': expected a whole number"),
        (rule('detector = "budget"\nkeep_firing_for = -1'),
         r"field 'keep_firing_for': -1 is out of range"),
        (rule('detector = "budget"\nfor = 1.5'), r"field 'for': expected a whole number"),
        (rule('detector = "spike"\n[rule.params]\nwindow = 3'),
         r"field 'params.window': detector 'spike' has no parameter 'window' "
         r"\(it takes: mad_floor, min_jump_sequence, min_jump_token, min_rows, window_rows, z\)"),
        (rule('detector = "spike"\n[rule.params]\nwindow_rows = 2.5'),
         r"field 'params.window_rows': expected a whole number, got 2.5"),
        (rule('detector = "spike"\n[rule.params]\nz = "8"'),
         r"field 'params.z': expected a number, got '8'"),
        (rule('detector = "spike"\n[rule.params]\nz = true'), r"field 'params.z': expected a"),
        (rule('detector = "budget"\nsevrity = "info"'), r"rule 'r1' \(#1\): unknown field\(s\) "
         r"\['sevrity'\]"),
        (rule('severity = "info"'), r"field 'detector': missing or not a string"),
        (rule('detector = "budget"\nenabled = "yes"'), r"field 'enabled': expected true or false"),
        (rule('detector = "budget"') + rule('detector = "spike"'),
         r"rule 'r1' \(#2\): name is used twice"),
        ('[[rule]]\ndetector = "budget"\n', r"rule #1: field 'name' is missing"),
        (rule('detector = "budget"', name="has space"), r"rule #1: field 'name' is 'has space'"),
        ('[[rule]\nname = "x"', r"not valid TOML"),
        ('rules = 3\n', r"unknown top-level key\(s\) \['rules'\]"),
        ('rule = "x"\n', r"'rule' must be an array of tables"),
    ],
)  # fmt: skip
def test_invalid_rules_name_the_rule_and_field(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_rules(text, source="my.toml")
    assert str(info.value).startswith("my.toml: ")


def test_missing_rules_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_rules(tmp_path / "nope.toml")
