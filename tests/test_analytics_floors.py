"""Detectors judge size as well as surprise: absolute floors in the KL's own unit, a robust
scale that respects the decimal grid a log prints on, and a budget in the run's unit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitor.analytics import DETECTORS, RunContext


def _table(**columns: np.ndarray) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"step": np.arange(n), **columns})


def _quiet_grpo(n: int = 120, seed: int = 0) -> np.ndarray:
    """Per-token KL of a healthy GRPO run: 0.001-0.005 nats/token, noisy."""
    rng = np.random.default_rng(seed)
    return np.clip(0.003 + rng.normal(0.0, 0.0008, n), 1e-4, None)


def test_a_tiny_per_token_kl_jump_is_no_spike_but_a_real_one_is():
    k3 = _quiet_grpo()
    k3[80] = 0.02  # 7x the median, but 0.017 nats/token: below the 0.03 floor
    k3[100] = 0.08  # +0.077 nats/token
    found = DETECTORS["spike"](_table(k3=k3))
    assert [f.step for f in found] == [100]
    assert "0.08 nats/token" in found[0].message and found[0].level == pytest.approx(0.08)
    # the run's config may lower the floor (a run known to sit at 1e-3)
    low = RunContext(config={"kl_floor_per_token": 0.005})
    assert [f.step for f in DETECTORS["spike"](_table(k3=k3), low)] == [80, 100]


def test_a_quantised_log_does_not_make_small_values_huge():
    """veRL printing KL to 3 decimals: mostly 0.000, median and MAD exactly 0."""
    k3 = np.zeros(80)
    k3[[20, 35, 50]] = 0.001
    k3[60] = 0.008  # 8 steps of the grid: not 10 robust deviations
    df = _table(k3=k3)
    assert DETECTORS["spike"](df) == []
    no_floor = RunContext(config={"kl_floor_per_token": 0.0})
    assert DETECTORS["spike"](df, no_floor) == []  # the grid step alone keeps it at 8 sigma
    k3[70] = 0.2
    assert [f.step for f in DETECTORS["spike"](_table(k3=k3))] == [70]


def test_a_healthy_grpo_run_raises_no_kl_alert():
    """Per-token KL never above a few hundredths: nothing from the KL detectors, whatever
    its relative wiggles (it doubles from 0.002 to 0.004 halfway)."""
    k3 = _quiet_grpo(300)
    k3[150:] *= 2.0
    df = _table(k3=k3, reward_mean=np.linspace(0, 1, 300))
    for name in ("budget", "spike", "shift", "reward_hacking", "reference_offset"):
        assert DETECTORS[name](df) == [], name


def test_shift_needs_a_rise_above_the_floor():
    rng = np.random.default_rng(1)
    base = 0.02 + rng.normal(0.0, 0.001, 200)
    small, big = base.copy(), base.copy()
    small[120:] += 0.005  # +25% of a 0.02 plateau: 0.005 nats/token
    big[120:] += 0.03
    assert DETECTORS["shift"](_table(k3=small)) == []
    found = DETECTORS["shift"](_table(k3=big))
    assert found and 120 <= found[0].step <= 135 and "nats/token" in found[0].message


def test_budget_reads_the_kl_the_run_has_in_its_unit():
    rise = np.linspace(0.0, 0.8, 100)
    k3 = _table(k3=rise, resp_len_mean=np.full(100, 40.0))
    [first, *_] = DETECTORS["budget"](k3)  # default 0.5 nats/token
    assert "nats/token" in first.message and "default for KL in nats/token" in first.message
    assert first.threshold == 0.5
    cfg = RunContext(config={"kl_budget_per_token": 0.7})
    assert DETECTORS["budget"](k3, cfg)[0].threshold == 0.7
    # a per-sequence budget converts through the mean response length
    seq = RunContext(config={"kl_budget": 24.0})
    found = DETECTORS["budget"](k3, seq)
    assert found[0].threshold == pytest.approx(0.6)
    assert "config kl_budget / mean response length 40" in found[0].message
    per_seq = _table(kl_mean=rise * 80)  # up to 64 nats/sequence
    found = DETECTORS["budget"](per_seq)
    assert found[0].threshold == 50.0 and "nats/sequence" in found[0].message
    assert DETECTORS["budget"](per_seq, RunContext(config={"kl_budget": 100.0})) == []


def test_budget_holds_until_clearly_below():
    """Smoothed KL hovering at the budget: one stretch of findings, not a flicker."""
    i = np.arange(200)
    kl = 10 + 0.6 * np.sin(i / 3.0)
    kl[:50] = np.linspace(0, 10, 50)
    found = [f.step for f in DETECTORS["budget"](_table(kl_mean=kl), value=10.0)]
    assert found and found == list(range(found[0], 200))
