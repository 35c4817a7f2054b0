"""Detectors on the KL series itself: level, spikes, shifts, sign, start, concentration."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitor.analytics.detectors._common import (
    column_on,
    findings_where,
    kl_floor,
    kl_unit,
    latch,
    merge_by_step,
    num,
    robust_z,
    statistical_series,
    step_sem,
)
from monitor.analytics.findings import Context, Finding, as_context
from monitor.analytics.series import (
    MAD_TO_SIGMA,
    TOKEN_MEAN_COLUMNS,
    including,
    nanmean_std_rows,
    nanmedian_rows,
    pick_kl,
    valid,
    warmup_median,
)
from monitor.analytics.trends import halflife_ewma, resolve_budget


def budget(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    value: float | None = None,
    value_per_token: float | None = None,
    factor: float = 1.5,
    halflife_rows: float = 2.0,
    default_sequence: float = 50.0,
    default_token: float = 0.5,
    clear_fraction: float = 0.9,
) -> list[Finding]:
    """KL above the run's budget, judged on the KL the run has in that KL's own unit.

    The series is the run's first of ``kl_mean`` (nats/sequence), ``k3``, ``k1``
    (nats/token). Its budget (see ``resolve_budget``): per sequence, ``value``, else
    config ``kl_budget``, else ``factor`` x config ``target_kl``, else
    ``default_sequence``; per token, ``value_per_token``, else config
    ``kl_budget_per_token``, else ``factor`` x ``target_kl_per_token``, else the
    per-sequence budget over the mean response length, else ``default_token``. The KL
    is EWMA-smoothed over ``halflife_rows`` (0: raw) and, once above the budget, holds
    until it falls below ``clear_fraction`` x the budget (hysteresis), so that sampling
    noise around a plateau near the budget does not flap.
    """
    series = pick_kl(df)
    if series is None:
        return []
    unit = kl_unit(series)
    token = series in TOKEN_MEAN_COLUMNS
    steps, kl = valid(df, series)
    length = None
    if token:
        lengths = column_on(df, "resp_len_mean", steps)
        if np.isfinite(lengths).any():
            length = float(np.nanmedian(lengths))
    limit, source = resolve_budget(
        as_context(ctx),
        value_per_token if token else value,
        factor,
        series=series,
        length=length,
        default=default_token if token else default_sequence,
    )
    if limit is None:
        return []
    if source == "default":
        source = f"the default for KL in {unit}"
    level = halflife_ewma(kl, halflife_rows) if halflife_rows > 0 else kl
    smoothed = ", smoothed" if halflife_rows > 0 else ""
    return findings_where(
        latch(level > limit, level > clear_fraction * limit),
        steps,
        level,
        limit,
        lambda i: (
            f"KL ({series}{smoothed}) is {num(level[i])} {unit} at step {steps[i]}, above "
            f"its budget {num(limit)} {unit} ({source})."
        ),
        detector="budget",
        causes=(
            "KL coefficient too low, or the adaptive KL controller is off",
            "learning rate or PPO epochs per batch too high",
            "the policy is exploiting the reward model (reward hacking)",
        ),
        severity="critical",
        series=series,
        levels=kl,
        unit=unit,
    )


def spike(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    window_rows: int = 30,
    min_rows: int = 12,
    z: float = 8.0,
    mad_floor: float = 0.1,
    min_jump_token: float = 0.03,
    min_jump_sequence: float = 1.0,
) -> list[Finding]:
    """A step whose KL jumps far above the trailing ``window_rows`` rows.

    Robust z-score: (KL - median) / max(1.4826 MAD, ``mad_floor`` x |median|, the step
    the values are printed on, floor / ``z``); the relative floor keeps a nearly flat
    series from turning tiny wiggles into huge scores, the absolute one makes a jump
    smaller than the floor score below ``z``, however quiet the series was before. The
    floor is ``min_jump_token`` nats/token for k1/k3 and ``min_jump_sequence``
    nats/sequence for ``kl_mean`` (the run config's ``kl_floor_per_token`` /
    ``kl_floor_per_sequence`` override them). Judged on each of ``kl_mean`` and ``k3``
    the table has (see ``statistical_series``).
    """
    return merge_by_step(
        _spike_on(
            df,
            series,
            window_rows,
            min_rows,
            z,
            mad_floor,
            kl_floor(ctx, series, min_jump_token, min_jump_sequence),
        )
        for series in statistical_series(df)
    )


def _spike_on(
    df: pd.DataFrame,
    series: str,
    window_rows: int,
    min_rows: int,
    z: float,
    mad_floor: float,
    floor: float,
) -> list[Finding]:
    steps, kl = valid(df, series)
    sem = step_sem(df, series, steps)
    score, center, count = robust_z(kl, window_rows, min_rows, mad_floor, sem, floor / z)
    unit = kl_unit(series)
    with np.errstate(invalid="ignore"):
        hit = score > z
    return findings_where(
        hit,
        steps,
        score,
        z,
        lambda i: (
            f"KL ({series}) spiked to {num(kl[i])} {unit} at step {steps[i]}, "
            f"{num(kl[i] - center[i])} above the median {num(center[i])} of the "
            f"{count[i]} rows before it ({num(score[i])} robust deviations)."
        ),
        detector="spike",
        causes=(
            "an outlier batch (very long or degenerate responses)",
            "a too-large update: learning-rate spike, loss-scale or gradient blow-up",
            "numerical issue in the log-probs of a few tokens (fp16/bf16 overflow)",
        ),
        severity="warning",
        series=series,
        levels=kl,
        unit=unit,
    )


def shift(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    ref_rows: int = 40,
    test_rows: int = 10,
    min_ref_rows: int = 10,
    k: float = 1.5,
    h: float = 12.0,
    clip: float = 4.0,
    sigma_floor: float = 0.1,
    min_rise_token: float = 0.01,
    min_rise_sequence: float = 0.5,
) -> list[Finding]:
    """KL departing upward from its own recent trend, and staying there (CUSUM).

    Works on log KL, so the statistic is relative and the same at any scale. The
    reference is the ``ref_rows`` rows before the last ``test_rows``: their level and
    their slope (never negative), extrapolated into the test rows. Healthy training
    raises KL from 0 toward a plateau, a curve whose log is concave, so the extrapolated
    trend overshoots it and the residuals stay negative; a level shift or an acceleration
    leaves positive residuals. Each test row adds its residual in robust standard
    deviations (clipped at ``clip`` so one spike cannot fire alone) minus ``k`` to an
    upper CUSUM; the step fires when the CUSUM ends above ``h`` and the last rows sit
    above the trend by at least an absolute floor (median of the last 3): ``min_rise_token``
    nats/token for k1/k3, ``min_rise_sequence`` nats/sequence for ``kl_mean`` (the run
    config's ``kl_floor_per_token`` / ``kl_floor_per_sequence`` override them), so a
    relative move of a KL of a few thousandths of a nat raises nothing. Judged on each of
    ``kl_mean`` and ``k3`` the table has (see ``statistical_series``).
    """
    return merge_by_step(
        _shift_on(
            df,
            series,
            (ref_rows, test_rows, min_ref_rows),
            (k, h, clip, sigma_floor),
            kl_floor(ctx, series, min_rise_token, min_rise_sequence),
        )
        for series in statistical_series(df)
    )


def _shift_on(
    df: pd.DataFrame,
    series: str,
    rows: tuple[int, int, int],
    cusum_params: tuple[float, float, float, float],
    floor: float,
) -> list[Finding]:
    ref_rows, test_rows, min_ref_rows = rows
    k, h, clip, sigma_floor = cusum_params
    steps, kl = valid(df, series)
    keep = kl > 0
    steps, kl = steps[keep], kl[keep]
    n = len(kl)
    if n < min_ref_rows + test_rows:
        return []
    y = np.log(kl)
    x = steps.astype(float)
    level, slope, sigma = _trends(x, y, ref_rows)
    # Row i is tested on its last test_rows rows against the window ending just before.
    ref_end = np.arange(n) - test_rows
    judged = ref_end >= min_ref_rows - 1
    end = np.where(judged, ref_end, 0)
    cols = np.arange(-test_rows + 1, 1)
    test_x = x[np.clip(np.arange(n)[:, None] + cols, 0, None)]
    test_y = y[np.clip(np.arange(n)[:, None] + cols, 0, None)]
    resid = test_y - (level[end, None] + slope[end, None] * (test_x - x[end, None]))
    z = np.clip(resid / np.maximum(sigma[end], sigma_floor)[:, None], -clip, clip)
    cusum = np.zeros(n)
    for c in range(test_rows):
        cusum = np.maximum(0.0, cusum + z[:, c] - k)
    score = np.where(judged, cusum, np.nan)
    growth = np.exp(np.median(resid[:, -3:], axis=1))
    # how far above the trend the last rows sit, in the series' own unit
    rise = np.median(np.exp(test_y[:, -3:]) * -np.expm1(-resid[:, -3:]), axis=1)
    unit = kl_unit(series)
    with np.errstate(invalid="ignore"):
        hit = (score > h) & (rise >= floor)
    return findings_where(
        hit,
        steps,
        score,
        h,
        lambda i: (
            f"KL ({series}) at step {steps[i]} has run above its recent trend for "
            f"{test_rows} rows: {num(kl[i])} {unit}, about {num(growth[i])}x the trend, "
            f"{num(rise[i])} above it (CUSUM {num(score[i])} > {num(h)})."
        ),
        detector="shift",
        causes=(
            "a change in the optimisation: learning rate, batch, KL coefficient",
            "new data or a new prompt mix reaching the policy",
            "the policy found a new way to raise reward (check reward vs sqrt(KL))",
        ),
        severity="warning",
        series=series,
        levels=kl,
        unit=unit,
    )


def _trends(x: np.ndarray, y: np.ndarray, rows: int) -> tuple[np.ndarray, ...]:
    """Per row j, the trend of the window of up to ``rows`` rows ending at j: its robust
    level at x[j], non-negative slope and residual scale (see ``_trend``)."""
    n = len(y)
    level, slope, sigma = np.empty(n), np.empty(n), np.empty(n)
    for j in range(min(n, rows - 1)):
        level[j], slope[j], sigma[j] = _trend(x[: j + 1], y[: j + 1])
    if n >= rows:
        xs = np.lib.stride_tricks.sliding_window_view(x, rows)
        ys = np.lib.stride_tricks.sliding_window_view(y, rows)
        half = rows // 2
        m1, m2 = np.median(ys[:, :half], axis=1), np.median(ys[:, half:], axis=1)
        c1, c2 = xs[:, :half].mean(axis=1), xs[:, half:].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(c2 > c1, np.maximum(0.0, (m2 - m1) / (c2 - c1)), 0.0)
        last = xs[:, -1]
        a = m2 + b * (last - c2)
        resid = ys - (a[:, None] + b[:, None] * (xs - last[:, None]))
        spread = np.abs(resid - np.median(resid, axis=1, keepdims=True))
        level[rows - 1 :], slope[rows - 1 :] = a, b
        sigma[rows - 1 :] = MAD_TO_SIGMA * np.median(spread, axis=1)
    return level, slope, sigma


def _trend(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Robust level at the last x, non-negative slope, and residual scale of a window.

    The slope joins the medians of the window's two halves (resistant to outliers).
    """
    half = len(y) // 2
    if half == 0:
        return float(y[-1]), 0.0, 0.0
    m1, m2 = np.median(y[:half]), np.median(y[half:])
    c1, c2 = np.mean(x[:half]), np.mean(x[half:])
    slope = max(0.0, (m2 - m1) / (c2 - c1)) if c2 > c1 else 0.0
    level = m2 + slope * (x[-1] - c2)
    resid = y - (level + slope * (x - x[-1]))
    return level, slope, MAD_TO_SIGMA * float(np.median(np.abs(resid - np.median(resid))))


def negative_kl(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    window_rows: int = 10,
    min_rows: int = 10,
    min_negative_share: float = 0.7,
    t: float = 3.0,
    neg_frac: float = 0.5,
) -> list[Finding]:
    """KL persistently below zero, which a true KL never is.

    Over the last ``window_rows`` rows (judged from ``min_rows``): at least
    ``min_negative_share`` of them negative with a mean ``t`` standard errors below zero
    (``kl_mean``, else ``k1``; ``k3`` is >= 0 by construction). Or, over a full window
    whose mean is ``t / 2`` standard errors below zero, most sequences negative
    (``neg_kl_frac`` > ``neg_frac``) in that share of rows: at KL ~0 (a run's first
    steps) about half the sequences are negative by chance.
    """
    series = pick_kl(df, ("kl_mean", "k1"))
    if series is None:
        return []
    steps, kl = valid(df, series)
    windows = including(kl, window_rows)
    count = np.isfinite(windows).sum(axis=1)
    mean, sd = nanmean_std_rows(windows)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (windows < 0).sum(axis=1) / count
        sem = sd / np.sqrt(count)
        tstat = np.where(sem > 0, mean / sem, np.where(mean < 0, -np.inf, 0.0))
    by_value = (count >= min_rows) & (share >= min_negative_share) & (tstat < -t)
    frac = including(column_on(df, "neg_kl_frac", steps), window_rows)
    frac_count = np.isfinite(frac).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_share = (frac > neg_frac).sum(axis=1) / frac_count
    by_frac = (frac_count >= window_rows) & (frac_share >= min_negative_share) & (tstat < -t / 2)
    median_frac = nanmedian_rows(frac)
    return findings_where(
        by_value | by_frac,
        steps,
        mean,
        0.0,
        lambda i: (
            f"KL ({series}) has stayed below zero: mean {num(mean[i])} over the last "
            f"{count[i]} rows to step {steps[i]}, {share[i]:.0%} of them negative"
            + (
                f", {median_frac[i]:.0%} of sequences negative (median)."
                if np.isfinite(median_frac[i])
                else "."
            )
            + " Policy and reference log-probs do not describe the sampled tokens alike."
        ),
        detector="negative_kl",
        causes=(
            "sampling temperature / top-p / top-k applied at generation but not when "
            "scoring (or the other way round)",
            "tokenizer or chat template differs between policy and reference",
            "precision mismatch (bf16 vs fp32) or the reference computed in train mode "
            "with dropout",
        ),
        severity="critical",
        series=series,
    )


def reference_offset(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    first_rows: int = 5,
    min_rows: int = 3,
    min_ratio: float = 0.25,
    min_token_kl: float = 0.01,
    min_sequence_kl: float = 1.0,
) -> list[Finding]:
    """KL already far from 0 in the run's first rows: the reference is not the initial policy.

    A run starting from its reference has KL ~0 at step 0, rising after. Judged on the
    first ``first_rows`` rows (from ``min_rows`` on): their median must exceed a noise
    floor (``min_token_kl`` nats per token; ``min_sequence_kl`` nats per sequence when
    the length is unknown), and the first row must already hold ``min_ratio`` of it
    (no rise from ~0). The verdict then holds for every later step.
    """
    series = pick_kl(df)
    if series is None:
        return []
    steps, kl = valid(df, series)
    n = len(kl)
    if n < min_rows:
        return []
    length = column_on(df, "resp_len_mean", steps)
    level = warmup_median(kl, first_rows)
    if series in TOKEN_MEAN_COLUMNS:
        per_token, floor, unit = level, np.full(n, min_token_kl), "nats/token"
    elif np.isfinite(length[:first_rows]).any():
        tokens = warmup_median(np.nan_to_num(length, nan=np.nanmedian(length)), first_rows)
        per_token, floor, unit = level / tokens, np.full(n, min_token_kl), "nats/token"
    else:
        per_token, floor, unit = level, np.full(n, min_sequence_kl), "nats/sequence"
    judged = np.arange(n) >= min_rows - 1
    hit = judged & (per_token > floor) & (kl[0] >= min_ratio * level)
    if not hit[: min(n, first_rows)].any():
        return []
    verdict = int(np.flatnonzero(hit)[0])
    hit[verdict:] = True
    last = min(n, first_rows) - 1
    basis = np.minimum(np.arange(n), last)
    return findings_where(
        hit,
        steps,
        level,
        floor,
        lambda i: (
            f"KL ({series}) was already {num(level[basis[i]])} over the first "
            f"{basis[i] + 1} rows ({num(kl[0])} at step {steps[0]}; "
            f"{num(per_token[basis[i]])} {unit}) where a policy that starts from its "
            "reference has ~0: the reference is not the initial policy."
        ),
        detector="reference_offset",
        causes=(
            "the reference checkpoint differs from the policy's starting weights",
            "an adapter (LoRA/PEFT) enabled on one side only, or a value head changing logits",
            "different tokenizer, chat template or generation config for the reference",
        ),
        severity="critical",
        series=series,
    )


def concentration(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    baseline_rows: int = 20,
    min_rows: int = 5,
    smooth_rows: int = 3,
    factor: float = 3.0,
    min_share: float = 0.2,
) -> list[Finding]:
    """KL carried by a few tokens: ``top1pct_share`` (median of the last ``smooth_rows``
    rows) above both ``min_share`` and ``factor`` x its warm-up median.
    """
    if "top1pct_share" not in df.columns:
        return []
    steps, share = valid(df, "top1pct_share")
    if len(share) < min_rows:
        return []
    current = nanmedian_rows(including(share, smooth_rows))
    base = warmup_median(share, baseline_rows)
    limit = np.maximum(min_share, factor * base)
    hit = (np.arange(len(share)) >= min_rows - 1) & (current > limit)
    return findings_where(
        hit,
        steps,
        current,
        limit,
        lambda i: (
            f"The top 1% of tokens carry {current[i]:.0%} of the positive log-ratio at "
            f"step {steps[i]} (warm-up {base[i]:.0%}): the KL sits in a few tokens."
        ),
        detector="concentration",
        causes=(
            "the policy learned a token or phrase the reference finds very unlikely "
            "(a reward-model trigger, a special or EOS token)",
            "degenerate repetition of a rare token",
            "a tokenization mismatch on a few tokens between policy and reference",
        ),
        severity="warning",
        series="top1pct_share",
    )
