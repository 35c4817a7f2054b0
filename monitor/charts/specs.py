"""What each chart shows: its lines, band, axis titles and what fills it (``CHARTS``),
shared by the plotly figures of the dashboard and the report and the matplotlib PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Line:
    column: str
    label: str
    dash: str = "solid"


@dataclass(frozen=True)
class ChartSpec:
    """One chart: its lines (one trace family per run), optional p05-p95 band, axis title.

    ``best_kl``: the chart draws each run's best KL quantity (``RunData.kl_column``) instead
    of its one line. ``kl_axis``: the y axis is a KL axis (the log-scale toggle applies).
    ``fills``: what would fill the chart, said when no shown run has data for it.
    """

    key: str
    title: str
    y_title: str
    lines: tuple[Line, ...]
    band: tuple[str, str] | None = None
    kind: str = "time"  # time | frontier
    best_kl: bool = False
    kl_axis: bool = False
    fills: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        cols = [ln.column for ln in self.lines]
        if self.band:
            cols += list(self.band)
        if self.best_kl or self.kind == "frontier":
            cols += list(KL_COLUMNS)
        return tuple(dict.fromkeys(cols))


#: Step columns that hold KL to the reference, best first (monitor.store.current_kl).
KL_COLUMNS: tuple[str, ...] = ("kl_mean", "k3", "k1", "k2")
PER_SEQUENCE, PER_TOKEN = "nats per sequence", "nats per token"


def kl_unit(column: str) -> str:
    """The unit of a KL column: kl_mean per sequence, k1/k2/k3 per token."""
    return PER_SEQUENCE if column == "kl_mean" else PER_TOKEN


CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec(
        "kl",
        "KL to the reference (band: p05-p95 over sequences)",
        "KL, nats per sequence (kl_seq, batch mean)",
        (Line("kl_mean", "KL"),),
        band=("kl_p05", "kl_p95"),
        best_kl=True,
        kl_axis=True,
        fills="kl_mean or a per-token k1/k2/k3 (log_step with log-probs, or an imported KL "
        "key such as TRL's kl or objective/kl; klmon import --map COLUMN=k3 names one)",
    ),
    ChartSpec(
        "estimators",
        "Per-token estimators k1 (solid), k2 (dot), k3 (dash)",
        "nats per token (k1, k2, k3 per token)",
        (Line("k1", "k1"), Line("k2", "k2", "dot"), Line("k3", "k3", "dash")),
        kl_axis=True,
        fills="k1, k2 or k3 (log_step with log-probs, or an imported per-token KL such as "
        "TRL GRPO's kl or veRL's kl_loss)",
    ),
    ChartSpec(
        "reward",
        "Reward",
        "reward (batch mean, reward-model units)",
        (Line("reward_mean", "reward"),),
        fills="reward_mean (log_step(rewards=...), or an imported reward key)",
    ),
    ChartSpec(
        "frontier",
        "Reward vs sqrt(KL): the over-optimisation frontier",
        "reward (batch mean)",
        (Line("reward_mean", "reward"),),
        band=None,
        kind="frontier",
        fills="a KL quantity and reward_mean at the same steps",
    ),
    ChartSpec(
        "nll",
        "Policy NLL (solid) and entropy (dot)",
        "nats per token",
        (Line("policy_nll", "NLL"), Line("entropy_mean", "entropy", "dot")),
        fills="policy_nll (log_step with log-probs) or entropy_mean (log_step(entropies=...), "
        "or an imported entropy key)",
    ),
    ChartSpec(
        "length",
        "Response length",
        "tokens per response (mean)",
        (Line("resp_len_mean", "length"),),
        fills="resp_len_mean (log_step with a mask, or an imported completion-length key)",
    ),
    ChartSpec(
        "concentration",
        "KL concentration",
        "share of positive log-ratio in the top 1% of tokens",
        (Line("top1pct_share", "top1pct_share"),),
        fills="top1pct_share (computed by log_step from per-token log-probs)",
    ),
    ChartSpec(
        "rollout_gap",
        "Rollout gap (inference engine vs trainer)",
        "nats per token (log p_rollout - log p_train)",
        (Line("rollout_gap", "gap"),),
        fills="rollout_gap (log_step(rollout_logprobs=...), or an imported rollout-gap key)",
    ),
)
CHARTS_BY_KEY = {c.key: c for c in CHARTS}
FRONTIER_X_TITLE = "sqrt(KL), sqrt(nats per sequence)"


def metric_axis_title(name: str, info: dict[str, Any] | None) -> str:
    """The y axis of an extra metric: its name and, from metric_info, what it means."""
    if not info:
        return f"{name} (as logged)"
    parts = []
    if info.get("source"):
        parts.append(f"from {info['source']}")
    if info.get("estimator"):
        parts.append(f"estimator {info['estimator']}")
    if info.get("scale"):
        parts.append(f"scale {info['scale']}")
    if info.get("quantity"):
        parts.append(f"stands for {info['quantity']}")
    return f"{name} ({', '.join(parts)})" if parts else f"{name} (as logged)"


def metric_chart(index: int, name: str, info: dict[str, Any] | None) -> ChartSpec:
    title = f"Metric {name}"
    if info and info.get("description"):
        title += f": {info['description']}"
    return ChartSpec(f"m{index}", title, metric_axis_title(name, info), (Line("value", name),))
