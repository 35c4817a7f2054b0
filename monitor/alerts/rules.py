"""Alert rules are data: a TOML file of ``[[rule]]`` tables, validated against the detectors
of ``monitor.analytics``.

```toml
[[rule]]
name = "kl-over-budget"        # unique; letters, digits, - _ .
detector = "budget"            # a key of monitor.analytics.DETECTORS
severity = "critical"          # info | warning | critical
for = 3                        # consecutive steps the condition must hold before it fires
keep_firing_for = 5            # consecutive clear steps before it resolves
description = "KL above the run's budget"   # optional
enabled = true                 # optional
escalate_factor = 3.0          # optional: notify again when the peak reaches 3x the opening
cooldown = 0                   # optional: rows after a resolve in which it cannot re-fire
[rule.params]                  # optional: the detector's keyword parameters
factor = 1.5
```

``for`` and ``keep_firing_for`` count step rows of the run (logged steps, not step numbers:
a run that logs every 10th step needs 3 rows for ``for = 3``); 0 and 1 both mean "at the
first step". Rows the ingester rejected (status ``rejected``) count for no rule but the
``rejected_input`` detector. Time-based detectors (``stalled``) judge the clock, not new
steps: they fire as soon as the detector says so and resolve when a step arrives. Rows
without the detector's inputs (``monitor.analytics.INPUTS``: a TRL row without generation
metrics, for ``length_drift``) count for neither: missing is not clear.

An episode tracks its peak (the KL, or whatever level the detector reports, and its step).
When a firing episode's peak reaches ``escalate_factor`` x the level its last notification
gave, it escalates: one more notification, headed by the peak (0 turns this off).
``cooldown`` rows after an episode resolves, the rule cannot open a new one.
"""

from __future__ import annotations

import inspect
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from monitor.errors import ConfigError
from monitor.store.alerts import SEVERITIES

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
#: Detectors whose condition depends on the clock (ctx.now) rather than on new steps.
TIME_BASED_DETECTORS = frozenset({"stalled"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_RULE_KEYS = {
    "name",
    "detector",
    "severity",
    "for",
    "keep_firing_for",
    "params",
    "description",
    "enabled",
    "escalate_factor",
    "cooldown",
}
DEFAULT_RULES_RESOURCE = "default_rules.toml"


@dataclass(frozen=True)
class Rule:
    """One alert rule: when ``detector`` (with ``params``) reports a step for ``for_steps``
    consecutive steps it fires at ``severity``; ``keep_firing_for`` clear steps resolve it;
    a peak ``escalate_factor`` x the last announced level escalates it; for ``cooldown``
    rows after a resolve it cannot open a new episode."""

    name: str
    detector: str
    severity: str = "warning"
    for_steps: int = 1
    keep_firing_for: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    enabled: bool = True
    escalate_factor: float = 3.0
    cooldown: int = 0

    @property
    def time_based(self) -> bool:
        return self.detector in TIME_BASED_DETECTORS

    @property
    def steps_to_fire(self) -> int:
        return max(1, self.for_steps)

    @property
    def steps_to_resolve(self) -> int:
        return max(1, self.keep_firing_for)


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, in file order, and where they came from."""

    rules: tuple[Rule, ...]
    source: str
    text: str = ""

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def enabled(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.enabled)

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


def default_rules_text() -> str:
    """The default rule pack shipped inside the package."""
    return resources.files("monitor.alerts").joinpath(DEFAULT_RULES_RESOURCE).read_text("utf-8")


def load_rules(
    path: str | Path | None = None,
    *,
    detectors: Mapping[str, Callable[..., Any]] | None = None,
    default_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> RuleSet:
    """Load and validate a rules file; ``None`` loads the packaged default pack.

    Raises ConfigError naming the file, the rule and the field for anything wrong.
    """
    if path is None:
        return parse_rules(
            default_rules_text(),
            source="default rules (monitor/alerts/default_rules.toml)",
            detectors=detectors,
            default_params=default_params,
        )
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"rules file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"rules file {str(p)!r} cannot be read: {exc}") from None
    return parse_rules(text, source=str(p), detectors=detectors, default_params=default_params)


def detector_registry() -> tuple[Mapping[str, Callable[..., Any]], Mapping[str, Mapping[str, Any]]]:
    """``monitor.analytics``'s DETECTORS and DEFAULT_PARAMS."""
    try:
        from monitor import analytics
    except ImportError as exc:  # pragma: no cover - analytics is part of the package
        raise ConfigError(f"the detectors of monitor.analytics cannot be loaded: {exc}") from exc
    detectors = getattr(analytics, "DETECTORS", None)
    if not isinstance(detectors, Mapping):
        raise ConfigError("monitor.analytics has no DETECTORS registry")
    return detectors, getattr(analytics, "DEFAULT_PARAMS", {}) or {}


def parse_rules(
    text: str,
    *,
    source: str = "<rules>",
    detectors: Mapping[str, Callable[..., Any]] | None = None,
    default_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> RuleSet:
    """Parse and validate the TOML text of a rules file."""
    if detectors is None:
        detectors, registry_params = detector_registry()
        if default_params is None:
            default_params = registry_params
    default_params = default_params or {}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"rule"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown)}: a rules file holds "
            "[[rule]] tables only"
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise ConfigError(f"{source}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = _parse_rule(raw, index, source, detectors, default_params)
        if rule.name in seen:
            raise ConfigError(f"{source}: rule {rule.name!r} (#{index}): name is used twice")
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(tuple(rules), source, text)


def _parse_rule(
    raw: Mapping[str, Any],
    index: int,
    source: str,
    detectors: Mapping[str, Callable[..., Any]],
    default_params: Mapping[str, Mapping[str, Any]],
) -> Rule:
    name = raw.get("name")
    where = f"{source}: rule #{index}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        shown = "missing" if name is None else repr(name)
        raise ConfigError(
            f"{where}: field 'name' is {shown}: expected a string of letters, digits, "
            "'-', '_' or '.' (at most 100 characters)"
        )
    where = f"{source}: rule {name!r} (#{index})"

    def fail(fieldname: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: field {fieldname!r}: {problem}")

    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {sorted(unknown)} (known: {', '.join(sorted(_RULE_KEYS))})"
        )
    detector = raw.get("detector")
    if not isinstance(detector, str):
        raise fail("detector", "missing or not a string")
    if detector not in detectors:
        raise fail(
            "detector", f"unknown detector {detector!r} (known: {', '.join(sorted(detectors))})"
        )
    severity = raw.get("severity", "warning")
    if severity not in SEVERITIES:
        raise fail("severity", f"{severity!r} is not one of {', '.join(SEVERITIES)}")
    for_steps = _nonneg_int(raw.get("for", 1), fail, "for")
    keep = _nonneg_int(raw.get("keep_firing_for", 0), fail, "keep_firing_for")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "expected a string")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("enabled", f"expected true or false, got {enabled!r}")
    escalate = raw.get("escalate_factor", 3.0)
    if isinstance(escalate, bool) or not isinstance(escalate, int | float):
        raise fail("escalate_factor", f"expected a number, got {escalate!r}")
    if not math.isfinite(escalate) or (escalate != 0 and escalate <= 1):
        raise fail("escalate_factor", f"{escalate!r}: expected 0 (off) or a number above 1")
    cooldown = _nonneg_int(raw.get("cooldown", 0), fail, "cooldown")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise fail("params", "expected a table ([rule.params])")
    params = _check_params(
        detector, params, detectors[detector], default_params.get(detector, {}), fail
    )
    return Rule(
        name=name,
        detector=detector,
        severity=severity,
        for_steps=for_steps,
        keep_firing_for=keep,
        params=params,
        description=description,
        enabled=enabled,
        escalate_factor=float(escalate),
        cooldown=cooldown,
    )


def _nonneg_int(value: Any, fail: Callable[[str, str], ConfigError], fieldname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(fieldname, f"expected a whole number of steps, got {value!r}")
    if value < 0 or value > 1_000_000:
        raise fail(fieldname, f"{value} is out of range (0 to 1000000 steps)")
    return value


def _check_params(
    detector: str,
    params: dict[str, Any],
    func: Callable[..., Any],
    defaults: Mapping[str, Any],
    fail: Callable[[str, str], ConfigError],
) -> dict[str, Any]:
    accepted, open_ended = _keyword_params(func)
    known = dict(accepted)
    known.update(defaults)
    for key, value in params.items():
        label = f"params.{key}"
        if key not in known and not open_ended:
            allowed = ", ".join(sorted(known)) or "none"
            raise fail(
                label, f"detector {detector!r} has no parameter {key!r} (it takes: {allowed})"
            )
        expected = known.get(key, inspect.Parameter.empty)
        problem = _type_problem(value, expected)
        if problem:
            raise fail(label, problem)
    return dict(params)


def _keyword_params(func: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """The keyword parameters of a detector (after df and ctx) with their defaults, and
    whether it takes **kwargs."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return {}, True
    out: dict[str, Any] = {}
    open_ended = False
    positional = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.kind is p.VAR_POSITIONAL:
            continue
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional < 2:
            positional += 1  # df, ctx
        elif p.kind is not p.POSITIONAL_ONLY:
            out[p.name] = p.default
    return out, open_ended


def _type_problem(value: Any, expected: Any) -> str | None:
    """Why ``value`` does not fit a parameter whose default is ``expected`` (None: it fits)."""
    if isinstance(value, dict):
        return "expected a number, string, boolean or list, got a table"
    if expected is inspect.Parameter.empty or expected is None:
        return None
    if isinstance(expected, bool):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(value, bool):
        return f"expected a {type(expected).__name__}, got {value!r}"
    if isinstance(expected, int):
        return None if isinstance(value, int) else f"expected a whole number, got {value!r}"
    if isinstance(expected, float):
        if not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        return None
    if isinstance(expected, str):
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if isinstance(expected, list | tuple):
        return None if isinstance(value, list) else f"expected a list, got {value!r}"
    return None
