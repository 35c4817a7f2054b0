"""Detectors on what the policy does besides its KL: entropy, reward, length, rollouts."""

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
    per_token_kl,
    robust_z,
    statistical_series,
    step_sem,
)
from monitor.analytics.findings import Context, Finding, as_context
from monitor.analytics.series import (
    MAD_TO_SIGMA,
    first_column,
    including,
    nanmedian_rows,
    valid,
    warmup_median,
)
from monitor.analytics.trends import expanding_slope, halflife_ewma, rolling_slope

#: Where a response length may live: ours, then TRL GRPO's logged names.
LENGTH_COLUMNS = ("resp_len_mean", "completions/mean_length", "completion_length")
#: Config keys holding the generation length cap.
LENGTH_CAP_KEYS = ("max_response_length", "max_completion_length", "max_new_tokens")

# Extra metric (by name suffix) with the share of truncated completions, as TRL logs it.
CLIPPED_SUFFIX = "clipped_ratio"


def entropy_collapse(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    baseline_rows: int = 20,
    min_rows: int = 5,
    smooth_rows: int = 3,
    ratio: float = 0.5,
    clear_ratio: float = 0.6,
) -> list[Finding]:
    """Policy entropy (``policy_nll``, else ``entropy_mean``; median of the last
    ``smooth_rows`` rows) below ``ratio`` x its median over the first ``baseline_rows``.

    Hysteresis: once below ``ratio``, the condition holds until the entropy is back above
    ``clear_ratio`` x the warm-up, so a slow decline hovering at the threshold is one
    episode, not several.
    """
    column = first_column(df, ("policy_nll", "entropy_mean"))
    if column is None:
        return []
    steps, values = valid(df, column)
    current = nanmedian_rows(including(values, smooth_rows))
    base = warmup_median(values, baseline_rows)
    limit = ratio * base
    judged = (np.arange(len(values)) >= min_rows - 1) & (base > 0)
    with np.errstate(invalid="ignore"):
        hit = latch(judged & (current < limit), judged & (current < clear_ratio * base))
    return findings_where(
        hit,
        steps,
        current,
        limit,
        lambda i: (
            f"Policy entropy ({column}) fell to {num(current[i])} nats/token at step "
            f"{steps[i]}, {current[i] / base[i]:.0%} of its warm-up {num(base[i])}."
        ),
        detector="entropy_collapse",
        causes=(
            "KL coefficient too low for the reward's pull: the policy turns deterministic",
            "learning rate too high or too many epochs on the same rollouts",
            "no entropy bonus while the reward favours one answer style",
        ),
        severity="critical",
        series=column,
    )


def reward_hacking(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    window_rows: int = 20,
    min_history_rows: int = 20,
    kl_growth: float = 0.25,
    kl_t: float = 4.0,
    gain_ratio: float = 0.5,
    gain_z: float = 2.0,
    halflife_rows: float = 10.0,
    jump_z: float = 6.0,
    reward_jump_z: float = 4.0,
    mad_floor: float = 0.1,
    min_jump_token: float = 0.03,
    min_jump_sequence: float = 1.0,
) -> list[Finding]:
    """Reward still rising while KL grows faster than the sqrt(KL) frontier allows.

    Healthy runs gain reward roughly in proportion to sqrt(KL). Over the last
    ``window_rows`` rows this fires when sqrt(KL) grew by at least ``kl_growth`` of its
    level (slope ``kl_t`` standard errors above 0), reward rose too, but reward per unit
    of sqrt(KL) gained in the window (ratio of the two slopes, even ``gain_z`` standard
    errors up) is below ``gain_ratio`` x the run's gain so far (smoothed reward regressed
    on smoothed sqrt(KL) up to the window's start, after ``min_history_rows`` rows).
    It also fires when KL and reward jump together at one step (robust z above
    ``jump_z`` and ``reward_jump_z``, the KL's by at least ``min_jump_token``
    nats/token or ``min_jump_sequence`` nats/sequence, or the run config's
    ``kl_floor_per_token`` / ``kl_floor_per_sequence``). Judged on each of ``kl_mean``
    and ``k3`` the table has (see ``statistical_series``).
    """
    if "reward_mean" not in df.columns:
        return []
    params = {
        "window_rows": window_rows,
        "min_history_rows": min_history_rows,
        "kl_growth": kl_growth,
        "kl_t": kl_t,
        "gain_ratio": gain_ratio,
        "gain_z": gain_z,
        "halflife_rows": halflife_rows,
        "jump_z": jump_z,
        "reward_jump_z": reward_jump_z,
        "mad_floor": mad_floor,
    }
    return merge_by_step(
        _hacking_on(
            df, series, **params, floor=kl_floor(ctx, series, min_jump_token, min_jump_sequence)
        )
        for series in statistical_series(df)
    )


def _hacking_on(
    df: pd.DataFrame,
    series: str,
    *,
    window_rows: int,
    min_history_rows: int,
    kl_growth: float,
    kl_t: float,
    gain_ratio: float,
    gain_z: float,
    halflife_rows: float,
    jump_z: float,
    reward_jump_z: float,
    mad_floor: float,
    floor: float,
) -> list[Finding]:
    steps, kl = valid(df, series)
    reward = column_on(df, "reward_mean", steps)
    keep = np.isfinite(reward)
    steps, kl, reward = steps[keep], kl[keep], reward[keep]
    n = len(kl)
    if n < window_rows:
        return []
    sqrt_kl = np.sqrt(np.clip(kl, 0.0, None))
    kl_slope, kl_se = _slope_and_se(steps, sqrt_kl, window_rows)
    reward_slope, reward_se = _slope_and_se(steps, reward, window_rows)
    span = steps - np.concatenate([np.full(window_rows - 1, steps[0]), steps])[:n]
    level = nanmedian_rows(including(sqrt_kl, window_rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = kl_slope * span / level
        local_gain = reward_slope / kl_slope
    # The run's gain so far: smoothed reward regressed on smoothed sqrt(KL) up to the
    # window's start (healthy runs keep it roughly constant).
    smooth_sqrt = halflife_ewma(sqrt_kl, halflife_rows)
    gain_so_far = expanding_slope(smooth_sqrt, halflife_ewma(reward, halflife_rows))
    start = np.arange(n) - window_rows + 1
    run_gain = np.where(start >= min_history_rows, gain_so_far[np.maximum(start, 0)], np.nan)
    # The gain is a ratio of two noisy slopes: fire only when even its upper confidence
    # bound (reward slope + gain_z standard errors) is below the threshold.
    with np.errstate(invalid="ignore"):
        frontier = (
            (growth >= kl_growth)
            & (kl_slope > kl_t * kl_se)
            & (reward_slope > 0)
            & (run_gain > 0)
            & (reward_slope + gain_z * reward_se < gain_ratio * run_gain * kl_slope)
        )
    kl_sem = step_sem(df, series, steps)
    kl_z, _, _ = robust_z(kl, window_rows, window_rows, mad_floor, kl_sem, floor / jump_z)
    reward_sem = step_sem(df, "reward_mean", steps)
    reward_z, _, _ = robust_z(reward, window_rows, window_rows, mad_floor, reward_sem)
    with np.errstate(invalid="ignore"):
        jump = (kl_z > jump_z) & (reward_z > reward_jump_z)
    value = np.where(frontier, local_gain, kl_z)
    limit = np.where(frontier, gain_ratio * run_gain, jump_z)

    def message(i: int) -> str:
        if frontier[i]:
            return (
                f"Reward keeps rising but buys little KL's worth: at step {steps[i]} "
                f"sqrt(KL) ({series}) grew {growth[i]:.0%} over {window_rows} rows while "
                f"reward gained {num(local_gain[i])} per unit of sqrt(KL), against "
                f"{num(run_gain[i])} earlier in the run."
            )
        return (
            f"KL ({series}) and reward jumped together at step {steps[i]}: KL "
            f"{num(kl_z[i])} and reward {num(reward_z[i])} robust deviations above their "
            "recent medians."
        )

    return findings_where(
        frontier | jump,
        steps,
        value,
        limit,
        message,
        detector="reward_hacking",
        causes=(
            "the policy exploits a flaw of the reward model (length, format, phrases)",
            "KL penalty too weak for the reward's scale",
            "reward-model over-optimisation: check samples of the highest-reward responses",
        ),
        severity="critical",
        series=series,
        levels=kl,
        unit=kl_unit(series),
    )


def _slope_and_se(
    steps: np.ndarray, values: np.ndarray, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope per step over the last ``rows`` rows and its standard error."""
    slope = rolling_slope(steps, values, rows)
    x = including(steps.astype(float), rows)
    y = including(values, rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = x - np.nanmean(x, axis=1, keepdims=True) if len(x) else x
        resid = y - np.nanmean(y, axis=1, keepdims=True) - slope[:, None] * dx
        dof = np.isfinite(resid).sum(axis=1) - 2
        se = np.sqrt(np.nansum(resid**2, axis=1) / dof / np.nansum(dx**2, axis=1))
    return slope, np.where(dof > 0, se, np.nan)


def length_drift(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    baseline_rows: int = 20,
    min_rows: int = 5,
    smooth_rows: int = 3,
    ratio: float = 1.5,
    shrink_ratio: float = 0.5,
    clipped_share: float = 0.95,
    cap_fraction: float = 0.95,
    compare_rows: int = 10,
) -> list[Finding]:
    """Response length far from its warm-up, or responses hitting the length cap.

    Fires when the mean length (median of the last ``smooth_rows`` rows) reaches
    ``ratio`` x its median over the first ``baseline_rows`` rows, or falls to
    ``shrink_ratio`` x (healthy runs often shed some length, rarely half); when a
    ``*clipped_ratio`` column (share of truncated completions, as TRL logs it) reaches
    ``clipped_share``; or when the mean length reaches ``cap_fraction`` of the config's
    cap. Since per-sequence KL is length x per-token KL, the message compares both with
    ``compare_rows`` rows earlier, saying whether the policy moved or only the length.
    """
    context = as_context(ctx)
    column = first_column(df, LENGTH_COLUMNS)
    clipped = first_column(df, [c for c in df.columns if str(c).endswith(CLIPPED_SUFFIX)])
    if column is None and clipped is None:
        return []
    steps = df["step"].to_numpy().astype(np.int64)
    length = column_on(df, column, steps)
    share = column_on(df, clipped, steps)
    keep = np.isfinite(length) | np.isfinite(share)
    steps, length, share = steps[keep], length[keep], share[keep]
    n = len(steps)
    current = nanmedian_rows(including(length, smooth_rows))
    base = _warmup_skipping_nan(length, baseline_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = current / base
    judged = np.cumsum(np.isfinite(length)) >= min_rows
    drift = judged & ((moved >= ratio) | (moved <= shrink_ratio))
    share_now = nanmedian_rows(including(share, smooth_rows))
    truncated = share_now >= clipped_share
    cap = context.config_float(*LENGTH_CAP_KEYS)
    at_cap = current >= cap_fraction * cap if cap else np.zeros(n, dtype=bool)
    token_kl, token_source = per_token_kl(df, steps)
    token_now = nanmedian_rows(including(token_kl, smooth_rows))
    earlier = np.arange(n) - compare_rows
    with np.errstate(divide="ignore", invalid="ignore"):
        length_change = np.where(earlier >= 0, current / current[np.maximum(earlier, 0)], np.nan)
        token_change = np.where(earlier >= 0, token_now / token_now[np.maximum(earlier, 0)], np.nan)
    by_length = drift | at_cap
    value = np.where(by_length, moved, share_now)
    limit = np.where(by_length, np.where(moved >= 1, ratio, shrink_ratio), clipped_share)

    def message(i: int) -> str:
        parts = []
        if by_length[i]:
            parts.append(
                f"Mean response length ({column}) is {num(current[i])} tokens at step "
                f"{steps[i]}, {num(moved[i])}x its warm-up {num(base[i])}"
                + (f", at the cap {num(cap)}" if at_cap[i] else "")
                + "."
            )
        if truncated[i]:
            parts.append(f"{share_now[i]:.0%} of completions hit the length cap ({clipped}).")
        if token_source and np.isfinite(length_change[i]) and np.isfinite(token_change[i]):
            verdict = (
                "the per-sequence KL follows the length, not a drift of the policy"
                if 0.8 <= token_change[i] <= 1.25
                else "the policy's per-token KL moved as well"
            )
            parts.append(
                f"Over the last {compare_rows} rows the length changed {num(length_change[i])}x "
                f"and the per-token KL ({token_source}) {num(token_change[i])}x: {verdict}."
            )
        return " ".join(parts)

    return findings_where(
        drift | truncated | at_cap,
        steps,
        value,
        limit,
        message,
        detector="length_drift",
        causes=(
            "the reward favours long (or short) answers: length hacking",
            "the length cap truncates answers, so the reward sees cut-off text",
            "EOS handling: the policy stopped emitting (or the sampler ignores) the stop token",
        ),
        severity="warning",
        series=column if by_length.any() or clipped is None else clipped,
    )


def _warmup_skipping_nan(values: np.ndarray, rows: int) -> np.ndarray:
    """``warmup_median`` over the finite values, carried to the rows in between."""
    finite = np.isfinite(values)
    out = np.full(len(values), np.nan)
    out[finite] = warmup_median(values[finite], rows)
    return pd.Series(out).ffill().to_numpy()


def rollout_gap(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    baseline_rows: int = 20,
    min_rows: int = 5,
    smooth_rows: int = 3,
    z: float = 8.0,
    kl_fraction: float = 0.1,
) -> list[Finding]:
    """Rollout engine and trainer disagree on the log-probs of the sampled tokens.

    ``|rollout_gap - warm-up median|`` (median of the last ``smooth_rows`` rows) above
    both ``z`` x the warm-up's robust spread and ``kl_fraction`` x the per-token KL: a
    gap that is small next to the KL being controlled does not matter.
    """
    if "rollout_gap" not in df.columns:
        return []
    steps, gap = valid(df, "rollout_gap")
    n = len(gap)
    if n < min_rows:
        return []
    base = warmup_median(gap, baseline_rows)
    spread = np.empty(n)
    for i in range(min(n, baseline_rows)):
        spread[i] = MAD_TO_SIGMA * np.median(np.abs(gap[: i + 1] - base[i]))
    if n > baseline_rows:
        spread[baseline_rows:] = spread[baseline_rows - 1]
    current = nanmedian_rows(including(gap, smooth_rows)) - base
    token_kl, _ = per_token_kl(df, steps)
    kl_level = np.abs(nanmedian_rows(including(token_kl, smooth_rows)))
    limit = np.maximum(z * spread, kl_fraction * np.nan_to_num(kl_level))
    hit = (np.arange(n) >= min_rows - 1) & (limit > 0) & (np.abs(current) > limit)
    return findings_where(
        hit,
        steps,
        np.abs(current),
        limit,
        lambda i: (
            f"Rollout and trainer log-probs differ by {num(current[i])} nats/token at step "
            f"{steps[i]} (warm-up {num(base[i])}, threshold {num(limit[i])}): the samples "
            "do not come from the policy being trained."
        ),
        detector="rollout_gap",
        causes=(
            "the inference engine (vLLM, SGLang) runs stale or differently loaded weights",
            "precision or kernel differences between engine and trainer (fp8, bf16)",
            "sampling settings (temperature, top-p) not applied the same way on both sides",
        ),
        severity="warning",
        series="rollout_gap",
    )


def vocabulary_concentration(
    df: pd.DataFrame,
    ctx: Context = None,
    *,
    baseline_rows: int = 20,
    min_rows: int = 10,
    smooth_rows: int = 5,
    factor: float = 3.0,
    rise: float = 0.8,
    min_share: float = 0.3,
) -> list[Finding]:
    """The policy's drift narrows onto a few words: ``vocab_top_share`` (the share of the
    step's positive log-ratio mass, summed per token id over the whole batch, carried by its
    top 5 ids; median of the last ``smooth_rows`` rows) above ``min_share`` and above the
    first reached of ``factor`` x its warm-up median and the warm-up median plus ``rise`` of
    the room left above it (a share is bounded by 1). A large vocabulary's healthy share is
    low (10% triples to 30%); a tiny one's is high (65% must reach 93%: a KL shift that
    sharpens the whole distribution stays under it, a policy repeating two tokens does not).
    A run logged without token ids has no such column: no data, never "clear".
    """
    if "vocab_top_share" not in df.columns:
        return []
    steps, share = valid(df, "vocab_top_share")
    if len(share) < min_rows:
        return []
    current = nanmedian_rows(including(share, smooth_rows))
    base = warmup_median(share, baseline_rows)
    limit = np.maximum(min_share, np.minimum(factor * base, base + rise * (1.0 - base)))
    hit = (np.arange(len(share)) >= min_rows - 1) & (current > limit)
    return findings_where(
        hit,
        steps,
        current,
        limit,
        lambda i: (
            f"5 tokens carry {current[i]:.0%} of the positive log-ratio at step {steps[i]} "
            f"(warm-up {base[i]:.0%}): the policy's drift narrows onto a few words."
        ),
        detector="vocabulary_concentration",
        causes=(
            "reward hacking: the reward model pays for a word or phrase the policy now repeats",
            "style or mode collapse onto a few tokens (an opener, a format or special token)",
            "degenerate repetition",
        ),
        severity="warning",
        series="vocab_top_share",
    )
