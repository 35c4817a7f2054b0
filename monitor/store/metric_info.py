"""What an extra metric means: the ``metric_info`` table.

An imported scalar keeps its source name (``kl``, ``objective/kl``, ``actor/kl_loss``) and a
row here says where it came from, which klmon quantity it stands for (if any), and the
estimator and scale of a KL-like key, so a chart can say "TRL GRPO kl: k3, token mean" and
klmon never mixes a source's own KL with its recomputed one.

Rows are written with ``ON CONFLICT DO NOTHING``: re-importing a file changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy import text

from monitor.store._bulk import insert_rows
from monitor.store.database import Database
from monitor.store.metric_blocks import stored_metric_names

if TYPE_CHECKING:
    import pandas as pd

METRIC_INFO_COLUMNS: tuple[str, ...] = (
    "name",
    "source",
    "quantity",
    "estimator",
    "scale",
    "description",
)

# Column widths of the table (tables.metric_info); longer values are cut, never refused.
_WIDTHS = {"name": 200, "source": 50, "quantity": 50, "estimator": 20, "scale": 20}


@dataclass(frozen=True)
class MetricInfo:
    """The meaning of one extra metric of a run.

    ``quantity``: the klmon step column this metric fills (``kl_mean``, ``k3``, ...), or None
    when it is kept only as a metric. ``estimator``: ``k1`` | ``k2`` | ``k3`` | ... for KL-like
    keys. ``scale``: ``token-mean`` (mean over tokens), ``seq-sum`` (per-sequence sum, batch
    mean), ``seq-mean`` (per-sequence token mean, batch mean), ``seq`` (one value per
    sequence, batch mean), ``tokens`` (a count of tokens), ...
    """

    name: str
    source: str | None = None
    quantity: str | None = None
    estimator: str | None = None
    scale: str | None = None
    description: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _cut(column: str, value: str | None) -> str | None:
    width = _WIDTHS.get(column)
    if value is None or width is None:
        return value
    return value[:width]


def write_metric_info(db: Database, run_id: int, infos: Sequence[MetricInfo]) -> int:
    """Insert metric meanings for a run; a name already described is left alone.

    Returns the number of rows inserted.
    """
    if not infos:
        return 0
    cols = ("run_id", *METRIC_INFO_COLUMNS)
    seen: set[str] = set()
    tuples = []
    for info in infos:
        if info.name in seen:
            continue
        seen.add(info.name)
        values = info.as_dict()
        tuples.append((run_id, *(_cut(c, values[c]) for c in METRIC_INFO_COLUMNS)))
    with db.begin() as conn:
        return insert_rows(conn, "metric_info", cols, tuples, key=("run_id", "name"))


def read_metric_info(db: Database, run_id: int) -> dict[str, MetricInfo]:
    """The meanings of a run's metrics, by metric name."""
    with db.begin() as conn:
        rows = conn.execute(
            text(
                f"SELECT {', '.join(METRIC_INFO_COLUMNS)} FROM metric_info "
                "WHERE run_id = :run ORDER BY name"
            ),
            {"run": run_id},
        ).all()
    return {r[0]: MetricInfo(*r) for r in rows}


def metric_info_frame(db: Database, run_id: int) -> pd.DataFrame:
    """The meanings of a run's metrics as a DataFrame.

    Columns: name, source, quantity, estimator, scale, description.
    """
    import pandas as pd  # here: the importers that write metric_info do without it

    infos = read_metric_info(db, run_id).values()
    return pd.DataFrame([i.as_dict() for i in infos], columns=list(METRIC_INFO_COLUMNS))


def described_metric_names(db: Database, run_ids: Sequence[int]) -> list[str]:
    """Extra metric names of any of the runs, sorted: those metric_info describes plus
    those found among the metrics themselves (metric_info is optional)."""
    names: set[str] = set()
    with db.begin() as conn:
        for rid in run_ids:
            names.update(
                r[0]
                for r in conn.execute(
                    text("SELECT name FROM metric_info WHERE run_id = :r"), {"r": rid}
                ).all()
            )
            names.update(stored_metric_names(conn, rid))
    return sorted(names)
