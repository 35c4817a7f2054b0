"""Detectors on simulated runs: caught within 25 steps, quiet when healthy, causal, and
the same at KL ~0.02 per token (GRPO) as at ~14 nats per sequence (PPO)."""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pytest

from monitor.analytics import DETECTORS, RunContext, has_inputs
from monitor.simulate import SCENARIOS, SimulatedRun, grpo_view, simulate_run

ONSET = 250
MAX_DELAY = 25
KINDS = [k for k in SCENARIOS if k != "healthy"]
VIEWS = ("sequence", "token", "grpo")
#: GRPO logs k3 only (>= 0 by construction) and no token shares.
UNOBSERVABLE = {("grpo", "negative_kl"), ("grpo", "concentration")}
KL_COLUMNS = [
    "kl_mean", "kl_std", "kl_min", "kl_p05", "kl_p50", "kl_p95", "kl_p99", "kl_max",
    "k1", "k3",
]  # fmt: skip


@cache
def simulated(kind: str, scale: str, seed: int, steps: int) -> SimulatedRun:
    onset = None if kind == "healthy" else ONSET
    return simulate_run(kind, steps=steps, seed=seed, onset=onset, scale=scale)  # type: ignore[arg-type]


def as_view(kind: str, view: str, seed: int, steps: int) -> SimulatedRun:
    run = simulated(kind, "sequence" if view == "sequence" else "token", seed, steps)
    return grpo_view(run) if view == "grpo" else run


def scenario(kind: str, view: str, seed: int = 0) -> SimulatedRun:
    return as_view(kind, view, seed, ONSET + 80)


def healthy(view: str, seed: int = 0) -> SimulatedRun:
    return as_view("healthy", view, seed, 2000)


def first_delay(run: SimulatedRun, name: str, ctx: RunContext | None = None) -> int | None:
    found = [f.step for f in DETECTORS[name](run.steps_df, ctx or run.context())]
    after = [s for s in found if s >= run.onset]
    return after[0] - run.onset if after else None


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "stalled"])
def test_each_failure_is_caught_within_25_steps(kind, view):
    if (view, kind) in UNOBSERVABLE:
        pytest.skip(f"a {view} run cannot show {kind}")
    run = scenario(kind, view)
    delay = first_delay(run, kind)
    assert delay is not None and delay <= MAX_DELAY, f"{kind} on {view}: delay {delay}"
    early = [f.step for f in DETECTORS[kind](run.steps_df, run.context()) if f.step < run.onset]
    assert early == [], f"{kind} fired before its onset at {early}"


def test_stalled_fires_after_ten_intervals_only_while_running():
    run = scenario("stalled", "sequence")
    interval = run.step_seconds
    quiet = run.context(now=run.last_seen_at + 9 * interval)
    loud = run.context(now=run.last_seen_at + 11 * interval)
    assert DETECTORS["stalled"](run.steps_df, quiet) == []
    [finding] = DETECTORS["stalled"](run.steps_df, loud)
    assert finding.step == run.onset == run.steps_df["step"].iloc[-1]
    assert finding.value == pytest.approx(11 * interval)
    finished = RunContext(run.config, "finished", run.last_seen_at, loud.now)
    assert DETECTORS["stalled"](run.steps_df, finished) == []
    assert DETECTORS["stalled"](run.steps_df, RunContext(status="running")) == []  # no clock


@pytest.mark.parametrize("view", VIEWS)
def test_healthy_runs_raise_no_alert(view):
    run = healthy(view)
    fired = {
        name: [f.step for f in detector(run.steps_df, run.context())][:5]
        for name, detector in DETECTORS.items()
    }
    assert {name: steps for name, steps in fired.items() if steps} == {}


@pytest.mark.parametrize("kind", ["spike", "shift", "negative_kl", "reward_hacking", "budget"])
def test_findings_depend_only_on_the_past(kind):
    run = scenario(kind, "sequence")
    df = run.steps_df
    for name, detector in DETECTORS.items():
        if name == "stalled":  # judges the present (now vs last step), not the history
            continue
        full = detector(df, run.context())
        for cut in (ONSET - 1, ONSET + 3, ONSET + 20):
            part = detector(df[df["step"] <= cut], run.context())
            assert part == [f for f in full if f.step <= cut], (name, cut)


@pytest.mark.parametrize(
    "kind", ["spike", "shift", "budget", "negative_kl", "reward_hacking", "length_drift"]
)
@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_kl_detectors_are_scale_free(kind, factor):
    """With the absolute floors off, scaling every KL column (and the budget) by a constant
    changes no finding's step: the relative part of each test is scale-free."""
    run = scenario(kind, "sequence")
    scaled = run.steps_df.copy()
    scaled[KL_COLUMNS] *= factor
    scaled["k2"] *= factor**2
    no_floor = {"kl_floor_per_token": 0.0, "kl_floor_per_sequence": 0.0}
    base = RunContext({**run.config, **no_floor})
    ctx = RunContext({**run.config, **no_floor, "target_kl": run.config["target_kl"] * factor})
    for name in ("budget", "spike", "shift", "negative_kl", "reward_hacking", "length_drift"):
        before = [f.step for f in DETECTORS[name](run.steps_df, base)]
        after = [f.step for f in DETECTORS[name](scaled, ctx)]
        assert before == after, name


@pytest.mark.parametrize("kind", ["spike", "shift", "reward_hacking", "entropy_collapse"])
def test_same_scenario_caught_alike_at_both_scales(kind):
    """The PPO-like run (kl_mean ~14 nats) and the GRPO-like one (k3 ~0.02) of one seed."""
    delays = [first_delay(scenario(kind, view), kind) for view in ("sequence", "grpo")]
    assert None not in delays
    assert abs(delays[0] - delays[1]) <= 10, delays


def test_findings_name_the_series_they_judged():
    [finding] = DETECTORS["spike"](scenario("spike", "grpo").steps_df)
    assert finding.series == "k3" and "(k3)" in finding.message
    assert finding.step == ONSET and finding.value > finding.threshold
    seq = DETECTORS["spike"](scenario("spike", "sequence").steps_df)
    assert [f.series for f in seq] == ["kl_mean"]


def test_rejected_input_reports_every_rejected_step_with_its_reason():
    run = scenario("rejected_input", "sequence")
    found = DETECTORS["rejected_input"](run.steps_df)
    assert [f.step for f in found] == list(range(ONSET, ONSET + 30, 3))
    assert "must be finite" in found[0].message and "(1 rejected so far)" in found[0].message
    assert found[-1].value == 10


def test_budget_takes_the_rule_value_before_the_config():
    df = healthy("sequence").steps_df
    assert DETECTORS["budget"](df.iloc[:400], {"config": {}}) == []  # no budget known
    found = DETECTORS["budget"](df.iloc[:400], {"config": {"target_kl": 100.0}}, value=5.0)
    assert found and "rule value" in found[0].message


def test_reward_and_kl_jumping_together_is_reward_hacking():
    steps = np.arange(120)
    rng = np.random.default_rng(0)
    kl = 10 + rng.normal(0, 0.5, 120)
    reward = 1 + rng.normal(0, 0.05, 120)
    kl[100], reward[100] = 30.0, 2.0
    df = pd.DataFrame({"step": steps, "kl_mean": kl, "reward_mean": reward})
    found = DETECTORS["reward_hacking"](df)
    assert [f.step for f in found] == [100]
    assert "jumped together" in found[0].message
    kl_only = df.assign(reward_mean=1 + rng.normal(0, 0.05, 120))
    assert DETECTORS["reward_hacking"](kl_only) == []


def test_length_cap_from_the_config():
    df = scenario("length_drift", "sequence").steps_df.drop(columns="completions/clipped_ratio")
    found = DETECTORS["length_drift"](df, {"config": {"max_response_length": 64}})
    assert any("at the cap 64" in f.message for f in found)
    assert "per-sequence KL follows the length" in found[-1].message


def test_every_detector_copes_with_an_empty_or_kl_less_table():
    empty = pd.DataFrame({"step": pd.Series([], dtype="int64"), "wall_time": [], "status": []})
    no_kl = pd.DataFrame({"step": [0, 1, 2], "wall_time": [0.0, 1.0, 2.0], "status": "ok"})
    for name, detector in DETECTORS.items():
        assert detector(empty, RunContext(now=10.0)) == [], name
        assert detector(no_kl, RunContext(now=10.0)) == [], name


#: Scenarios whose policy does not narrow onto a few tokens (budget and entropy collapse
#: do: a policy pushed far along one direction ends up emitting its top token).
VOCABULARY_QUIET = (
    "healthy", "spike", "shift", "negative_kl", "length_drift", "rollout_gap",
    "reference_offset", "stalled", "rejected_input",
)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vocabulary_concentration_fires_on_a_policy_repeating_tokens(seed):
    run = simulated("reward_hacking", "sequence", seed, ONSET + 120)
    found = DETECTORS["vocabulary_concentration"](run.steps_df, run.context())
    assert found, "the run that repeats 'help' and '!!' raised nothing"
    assert ONSET <= found[0].step <= ONSET + 60
    assert found[0].series == "vocab_top_share" and found[0].value > found[0].threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", VOCABULARY_QUIET)
def test_vocabulary_concentration_is_silent_when_the_vocabulary_does_not_narrow(kind, seed):
    run = simulated(kind, "sequence", seed, ONSET + 120)
    found = DETECTORS["vocabulary_concentration"](run.steps_df, run.context())
    assert [f.step for f in found][:5] == []


def test_vocabulary_concentration_without_token_ids_is_no_data():
    run = simulated("reward_hacking", "sequence", 0, ONSET + 120)
    df = run.steps_df.drop(columns=["vocab_top_share"])
    assert DETECTORS["vocabulary_concentration"](df, run.context()) == []
    assert not has_inputs("vocabulary_concentration", df).any()
    assert has_inputs("vocabulary_concentration", run.steps_df).all()
