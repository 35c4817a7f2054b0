"""The analytics API a rule engine relies on: registry, defaults, context, lookback, purity."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest

from monitor.analytics import (
    DEFAULT_PARAMS,
    DETECTORS,
    Finding,
    RunContext,
    as_context,
    lookback_rows,
)
from monitor.simulate import simulate_run

NAMES = {
    "budget", "spike", "shift", "negative_kl", "entropy_collapse", "reward_hacking",
    "length_drift", "concentration", "rollout_gap", "reference_offset", "stalled",
    "rejected_input", "vocabulary_concentration",
}  # fmt: skip


@pytest.fixture(scope="module")
def run():
    return simulate_run("shift", steps=320, seed=4, onset=260)


def test_registry_names_and_signatures():
    assert set(DETECTORS) == NAMES == set(DEFAULT_PARAMS)
    for name, detector in DETECTORS.items():
        params = list(inspect.signature(detector).parameters.values())
        assert [p.name for p in params[:2]] == ["df", "ctx"], name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), name
        assert DEFAULT_PARAMS[name] == {p.name: p.default for p in params[2:]}


def test_every_detector_runs_with_its_defaults_spelled_out(run):
    for name, detector in DETECTORS.items():
        assert detector(run.steps_df, run.context(), **DEFAULT_PARAMS[name]) == detector(
            run.steps_df, run.context()
        )


def test_findings_are_frozen_and_complete(run):
    [first, *_] = DETECTORS["shift"](run.steps_df, run.context())
    assert isinstance(first, Finding) and first.detector == "shift"
    assert first.causes and first.severity == "warning" and first.series in {"kl_mean", "k3"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.step = 0  # type: ignore[misc]
    assert hash(first)


def test_context_from_a_mapping_or_a_run_object():
    assert as_context(None) == RunContext()
    ctx = as_context({"config": {"target_kl": 6}, "status": "finished", "now": 5.0})
    assert ctx.config_float("target_kl") == 6.0 and ctx.status == "finished" and ctx.now == 5.0
    info = SimpleNamespace(config={"kl_budget": 3}, status="running", last_seen_at=1.0)
    assert as_context(info).last_seen_at == 1.0 and as_context(info).now is None


@pytest.mark.parametrize("name", ["budget", "spike", "shift", "negative_kl"])
def test_a_tail_of_lookback_rows_judges_new_steps_like_the_full_table(run, name):
    rows = lookback_rows(name)
    assert rows is not None
    df = run.steps_df
    new = 5
    tail = df.iloc[-(rows + new) :]
    want = [f for f in DETECTORS[name](df, run.context()) if f.step > df["step"].iloc[-new - 1]]
    got = [f for f in DETECTORS[name](tail, run.context()) if f.step > df["step"].iloc[-new - 1]]
    assert [(f.step, f.series) for f in got] == [(f.step, f.series) for f in want]
    for a, b in zip(got, want, strict=True):
        assert a.value == pytest.approx(b.value, rel=1e-4)


def test_baseline_detectors_need_the_whole_run():
    for name in ("entropy_collapse", "length_drift", "reference_offset", "reward_hacking"):
        assert lookback_rows(name) is None
    assert lookback_rows("spike", window_rows=50) == 50


def test_analytics_imports_no_store_dashboard_or_alerts():
    code = (
        "import sys, monitor.analytics, monitor.simulate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'dash', 'sqlalchemy'} "
        "or m.startswith(('monitor.store', 'monitor.alerts', 'monitor.dashboard'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
