"""Trends: smoothing, slope, budget forecast, reward per sqrt(KL)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitor.analytics import (
    RunContext,
    compute_trends,
    forecast_crossing,
    halflife_ewma,
    resolve_budget,
    rolling_slope,
)


def test_ewma_is_causal_and_skips_nan():
    x = np.array([1.0, np.nan, 3.0, 5.0, 100.0])
    full = halflife_ewma(x, 2.0)
    assert np.allclose(halflife_ewma(x[:4], 2.0), full[:4])
    assert np.isfinite(full).all()
    assert full[1] == full[0] == 1.0


def test_rolling_slope_is_per_step_even_when_rows_are_sparse():
    steps = np.arange(0, 200, 10)
    slope = rolling_slope(steps, 0.5 * steps + 3.0, rows=5)
    assert np.isnan(slope[:2]).all()
    assert np.allclose(slope[2:], 0.5)


def test_forecast_crossing():
    assert forecast_crossing(100, 5.0, 0.1, 10.0) == pytest.approx(150.0)
    assert forecast_crossing(100, 5.0, 0.0, 10.0) is None
    assert forecast_crossing(100, 5.0, -0.1, 10.0) is None
    assert forecast_crossing(100, 12.0, -0.1, 10.0) == 100.0  # already above
    assert forecast_crossing(100, 5.0, 0.1, float("nan")) is None


def test_budget_sources_in_order():
    assert resolve_budget(RunContext(config={"target_kl": 6}), 9.0)[0] == 9.0
    ctx = RunContext(config={"target_kl": 6, "kl_budget": 8})
    assert resolve_budget(ctx) == (8.0, "config kl_budget")
    assert resolve_budget(RunContext(config={"target_kl": 6}), factor=2)[0] == 12.0
    assert resolve_budget(RunContext(config={"target_kl": "six"})) == (None, "no budget")


def _sqrt_frontier_run(n: int = 200, alpha: float = 0.8) -> pd.DataFrame:
    steps = np.arange(n)
    kl = 20.0 * (1 - np.exp(-steps / 30.0))
    return pd.DataFrame({"step": steps, "kl_mean": kl, "reward_mean": 0.3 + alpha * np.sqrt(kl)})


def test_compute_trends_on_the_sqrt_frontier():
    run = _sqrt_frontier_run()
    trends = compute_trends(run, {"config": {"target_kl": 10.0}}, budget_factor=1.0)
    assert trends.attrs["series"] == "kl_mean"
    # reward grows like sqrt(KL): the gain per unit of sqrt(KL) is the frontier's alpha
    assert trends["reward_per_sqrt_kl"].iloc[10:].to_numpy() == pytest.approx(0.8, rel=0.02)
    assert trends["reward_sqrt_kl_slope"].iloc[10:].to_numpy() == pytest.approx(0.8, rel=0.02)
    hacked = run.assign(kl_mean=run["kl_mean"] * np.where(run["step"] < 150, 1.0, 4.0))
    late = compute_trends(hacked).iloc[180:]
    assert (late["reward_sqrt_kl_slope"] < 0.2).all()  # KL x4 bought no reward
    assert (late["reward_per_sqrt_kl"] < 0.8).all()
    early = trends.iloc[5]
    assert early["kl_slope"] > 0 and early["budget_cross_step"] > early["step"]
    crossed = trends[trends["kl_ewma"] >= 10.0]
    assert (crossed["budget_cross_step"] == crossed["step"]).all()


def test_compute_trends_falls_back_to_k3_and_handles_no_kl():
    df = _sqrt_frontier_run().rename(columns={"kl_mean": "k3"})
    df["kl_mean"] = np.nan
    assert compute_trends(df).attrs["series"] == "k3"
    assert np.isnan(compute_trends(df)["budget_cross_step"]).all()  # no budget known
    empty = compute_trends(pd.DataFrame({"step": [1, 2], "reward_mean": [0.0, 1.0]}))
    assert empty.empty and empty.attrs["series"] is None
