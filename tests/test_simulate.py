"""The scenario simulator: the step-table contract, scales, determinism, raw batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitor.analytics import RunContext
from monitor.divergence import summarize
from monitor.errors import InvalidInput
from monitor.simulate import SCENARIOS, grpo_view, iter_batches, simulate_run

QUANTITIES = [
    "kl_mean", "kl_std", "kl_min", "kl_p05", "kl_p50", "kl_p95", "kl_p99", "kl_max",
    "k1", "k2", "k3", "neg_kl_frac", "top1pct_share", "resp_len_mean", "policy_nll",
    "entropy_mean", "reward_mean", "reward_std", "kl_coef", "rollout_gap", "n_sequences",
    "n_tokens",
]  # fmt: skip


@pytest.fixture(scope="module")
def healthy() -> dict[str, pd.DataFrame]:
    return {
        s: simulate_run("healthy", 600, seed=0, scale=s).steps_df for s in ("sequence", "token")
    }


def test_step_table_follows_the_contract(healthy):
    df = healthy["sequence"]
    assert {*QUANTITIES, "step", "wall_time", "status", "reject_reason"} <= set(df.columns)
    assert df["step"].tolist() == list(range(600))
    assert df["step"].dtype == np.int64
    assert (np.diff(df["wall_time"]) > 0).all()
    assert set(df["status"]) == {"ok"}
    assert "completions/clipped_ratio" in df.columns  # an extra, trainer-logged metric


@pytest.mark.parametrize(
    ("scale", "column", "low", "high"),
    [("sequence", "kl_mean", 10.0, 20.0), ("token", "k3", 0.01, 0.04)],
)
def test_healthy_kl_rises_from_zero_to_a_plateau(healthy, scale, column, low, high):
    kl = healthy[scale][column].to_numpy()
    assert kl[0] == 0.0  # the policy starts at its reference
    assert np.median(kl[1:10]) < 0.1 * low
    assert low < np.median(kl[400:]) < high
    assert abs(np.median(kl[400:500]) - np.median(kl[500:600])) < 0.15 * np.median(kl[400:])


def test_same_seed_same_run_and_same_prefix_for_every_kind():
    a = simulate_run("spike", 200, seed=3, onset=150).steps_df
    b = simulate_run("spike", 200, seed=3, onset=150).steps_df
    pd.testing.assert_frame_equal(a, b)
    healthy = simulate_run("healthy", 200, seed=3).steps_df
    pd.testing.assert_frame_equal(a.iloc[:150], healthy.iloc[:150])
    assert not a.iloc[150:].equals(healthy.iloc[150:])


def test_every_scenario_runs_and_knows_its_onset():
    for kind in SCENARIOS:
        run = simulate_run(kind, 120, seed=1, onset=80)
        expected = {"healthy": None, "reference_offset": 0}.get(kind, 80)
        if kind == "budget":  # the first step whose expected KL is above the budget
            assert 80 <= run.onset < 100
        else:
            assert run.onset == expected


def test_stalled_run_stops_logging_at_onset():
    run = simulate_run("stalled", 300, seed=0, onset=200)
    assert run.steps_df["step"].iloc[-1] == 200 == run.onset
    assert run.status == "running"
    assert run.last_seen_at == run.steps_df["wall_time"].iloc[-1]
    ctx = run.context(now=run.last_seen_at + 3600)
    assert isinstance(ctx, RunContext) and ctx.now == run.last_seen_at + 3600


def test_rejected_steps_carry_the_reason_and_no_quantities():
    df = simulate_run("rejected_input", 140, seed=0, onset=100).steps_df
    rejected = df[df["status"] == "rejected"]
    assert rejected["step"].tolist() == list(range(100, 130, 3))
    assert rejected["reject_reason"].str.contains("must be finite").all()
    assert rejected[QUANTITIES].isna().all().all()


def test_grpo_view_keeps_only_k3_and_converts_the_target():
    run = simulate_run("healthy", 50, seed=0, scale="token")
    view = grpo_view(run)
    assert view.steps_df[["kl_mean", "k1", "kl_p95", "top1pct_share"]].isna().all().all()
    pd.testing.assert_series_equal(view.steps_df["k3"], run.steps_df["k3"])
    assert view.config["target_kl_per_token"] == pytest.approx(run.config["target_kl"] / 40)


def test_batches_are_what_the_step_table_summarises():
    run = simulate_run("length_drift", 30, seed=2, onset=20)
    batches = list(iter_batches("length_drift", 30, seed=2, onset=20))
    assert [b.step for b in batches] == list(range(30))
    last = batches[-1]
    summary = summarize(
        last.policy_logprobs,
        last.ref_logprobs,
        last.mask,
        rewards=last.rewards,
        kl_coef=last.kl_coef,
        rollout_logprobs=last.rollout_logprobs,
        entropies=last.entropies,
        token_ids=last.token_ids,
    ).as_dict()
    assert summary["vocab_top_share"] is not None
    row = run.steps_df.iloc[-1]
    for name, value in summary.items():
        assert row[name] == pytest.approx(value), name
    assert len(last.texts) == 16
    assert [len(words) for words in last.tokens] == last.mask.sum(axis=1).tolist()


def test_stalled_batches_stop_at_onset():
    assert [b.step for b in iter_batches("stalled", 50, seed=0, onset=10)][-1] == 10


def test_unknown_kind_or_scale_is_refused():
    with pytest.raises(InvalidInput, match="unknown scenario"):
        simulate_run("exploding", 10)
    with pytest.raises(InvalidInput, match="scale"):
        simulate_run("healthy", 10, scale="galactic")  # type: ignore[arg-type]
