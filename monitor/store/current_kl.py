"""Which KL a run has, and its latest value.

A live klmon run has ``kl_mean`` (klmon's own per-sequence KL, nats per sequence); an
imported run often has only a source's per-token estimator: TRL GRPO's ``kl`` fills ``k3``,
veRL's ``critic/kl`` fills ``k1``, TRL PPO's ``objective/kl`` fills ``kl_mean``. Readers that
show "the KL of a run" (``klmon runs``, the Runs page, the dashboard's KL chart) take the first
of ``KL_PREFERENCE`` that the run has, and say which it is and in what unit; they never add
quantities of different units together.

The importer stores each source key both in its step column and as an extra metric, and says
in ``metric_info`` (quantity = the step column) which key it was and its estimator and scale;
``KLQuantity.source`` names that key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.store.database import Database

#: Step columns that hold KL to the reference, best first: klmon's per-sequence mean, then
#: the per-token estimators (k3 unbiased and >= 0, k1 unbiased, k2 biased).
KL_PREFERENCE: tuple[str, ...] = ("kl_mean", "k3", "k1", "k2")
PER_SEQUENCE = "nats per sequence"
PER_TOKEN = "nats per token"


@dataclass(frozen=True)
class KLQuantity:
    """One KL step column of a run: ``column`` (one of KL_PREFERENCE), and from metric_info
    the source key that filled it with its estimator and scale (None for klmon's own)."""

    column: str
    source: str | None = None
    estimator: str | None = None
    scale: str | None = None

    @property
    def unit(self) -> str:
        """``nats per sequence`` for kl_mean, ``nats per token`` for k1, k2, k3."""
        return PER_SEQUENCE if self.column == "kl_mean" else PER_TOKEN

    @property
    def short_unit(self) -> str:
        return "nats/seq" if self.column == "kl_mean" else "nats/token"

    @property
    def name(self) -> str:
        """``kl_mean``, or ``k3 from kl`` when an imported key filled it."""
        if self.source and self.source != self.column:
            return f"{self.column} from {self.source}"
        return self.column

    def label(self) -> str:
        """``k3 from kl, nats/token``: what a chart legend or a table cell says."""
        return f"{self.name}, {self.short_unit}"


@dataclass(frozen=True)
class CurrentKL:
    """A run's best KL quantity, its latest value and the step of that value."""

    quantity: KLQuantity
    step: int
    value: float


def kl_columns_present(db: Database, run_id: int) -> list[str]:
    """The columns of KL_PREFERENCE that hold a value at some step of the run, best first.
    Reads the stored rollups (a few rows whatever the run length)."""
    import numpy as np

    from monitor.store.series import read_series  # pandas: not for `klmon runs`

    s = read_series(db, run_id, KL_PREFERENCE, max_buckets=16).combined()
    if s.empty:
        return []
    return [c for c in KL_PREFERENCE if np.isfinite(s[c].to_numpy(dtype=float)).any()]


def _describe(db: Database, run_id: int, column: str) -> KLQuantity:
    from sqlalchemy import text  # here: the names above serve `klmon runs` without it

    with db.begin() as conn:
        row = conn.execute(
            text(
                "SELECT name, estimator, scale FROM metric_info "
                "WHERE run_id = :r AND quantity = :q ORDER BY name LIMIT 1"
            ),
            {"r": int(run_id), "q": column},
        ).first()
    if row is None:
        return KLQuantity(column)
    return KLQuantity(column, str(row[0]), row[1], row[2])


def best_kl(db: Database, run_id: int) -> KLQuantity | None:
    """The run's best available KL quantity, or None when it has no KL at all."""
    present = kl_columns_present(db, run_id)
    return _describe(db, run_id, present[0]) if present else None


def current_kl(db: Database, run_id: int) -> CurrentKL | None:
    """The latest value of the run's best KL quantity (the last step that has one)."""
    quantity = best_kl(db, run_id)
    if quantity is None:
        return None
    from sqlalchemy import text

    col = quantity.column  # one of KL_PREFERENCE, never user text
    with db.begin() as conn:
        row = conn.execute(
            text(
                f"SELECT step, {col} FROM steps WHERE run_id = :r AND {col} IS NOT NULL "
                "ORDER BY step DESC LIMIT 1"
            ),
            {"r": int(run_id)},
        ).first()
    if row is None:  # the steps were deleted meanwhile
        return None
    return CurrentKL(quantity, int(row[0]), float(row[1]))
