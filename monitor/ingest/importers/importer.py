"""``import_path``: read a log, then write its run, steps, metrics and meanings, idempotently.

The run is found by (project, name); steps and metrics go in with ``ON CONFLICT DO NOTHING``
(``write_steps``/``write_metrics``), so importing a file twice changes nothing. A step or
metric already stored with a different value is a conflict: it is reported and the stored
value is kept (import under another ``--run`` to keep both).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import Problem, file_size
from monitor.ingest.importers.detect import detect_format
from monitor.ingest.importers.registry import FORMATS
from monitor.ingest.importers.tables import Prepared
from monitor.store.database import Database
from monitor.store.domain import RunInfo
from monitor.store.drilldown import write_histograms, write_samples
from monitor.store.metric_info import write_metric_info
from monitor.store.models import STEP_QUANTITIES
from monitor.store.runs import find_run_by_name, get_or_create_run, set_run_status
from monitor.store.series import refresh_rollups
from monitor.store.steps import write_metrics, write_steps

DEFAULT_PROJECT = "imported"
STEP_BATCH = 5_000
METRIC_BATCH = 50_000
NONE_QUANTITIES = ("-", "none")

# Called with (phase, done, total): phase "read" counts bytes (or rows), "write" counts steps.
Progress = Callable[[str, int, int], None]


@dataclass
class ImportReport:
    """What an import did."""

    path: str
    format: str
    producer: str
    run: RunInfo
    created: bool
    steps_read: int = 0
    steps_inserted: int = 0
    steps_unchanged: int = 0
    step_conflicts: tuple[int, ...] = ()
    metrics_read: int = 0
    metrics_inserted: int = 0
    metrics_unchanged: int = 0
    metric_conflicts: list[tuple[int, str]] = field(default_factory=list)
    histograms_inserted: int = 0
    samples_inserted: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict[str, list[str]] = field(default_factory=dict)

    def summary_lines(self, max_problems: int = 5) -> list[str]:
        """A human summary: counts, mapping, conflicts, the first few skipped lines."""
        r = self.run
        lines = [
            f"imported {self.steps_inserted} steps, {self.metrics_inserted} metrics into run "
            f"{r.id} {r.project}/{r.name} (format {self.format}, producer {self.producer}"
            + (", new run)" if self.created else ", existing run)")
        ]
        if self.steps_unchanged or self.metrics_unchanged:
            lines.append(
                f"already stored and unchanged: {self.steps_unchanged} steps, "
                f"{self.metrics_unchanged} metrics"
            )
        if self.histograms_inserted or self.samples_inserted:
            lines.append(
                f"token histograms: {self.histograms_inserted}, samples: {self.samples_inserted}"
            )
        if self.mapping:
            shown = ", ".join(f"{q} <- {' | '.join(keys)}" for q, keys in self.mapping.items())
            lines.append(f"step columns filled: {shown}")
        else:
            lines.append("step columns filled: none (every key kept as a metric)")
        if self.step_conflicts:
            lines.append(
                f"CONFLICT: {len(self.step_conflicts)} steps differ from the stored ones and "
                f"were left as stored: {_few(self.step_conflicts)} "
                "(import under another --run name to keep both)"
            )
        if self.metric_conflicts:
            shown = ", ".join(f"{n}@{s}" for s, n in self.metric_conflicts[:5])
            lines.append(
                f"CONFLICT: {len(self.metric_conflicts)} metrics differ from the stored ones "
                f"and were left as stored: {shown}"
                + (" ..." if len(self.metric_conflicts) > 5 else "")
            )
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(
            f"{len(self.problems)} lines skipped" + (" (first shown):" if self.problems else "")
        )
        lines.extend(f"  {p}" for p in self.problems[:max_problems])
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return lines


def _few(steps: tuple[int, ...], n: int = 8) -> str:
    return ", ".join(map(str, steps[:n])) + (" ..." if len(steps) > n else "")


def parse_map(items: Mapping[str, str] | list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """``["kl_vs_ref=kl_mean", "kl=-"]`` -> ``{"kl_vs_ref": "kl_mean", "kl": None}``.

    QUANTITY must be a klmon step column (or ``-``: keep the column only as a metric).
    """
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            column, sep, quantity = item.rpartition("=")
            if not sep or not column.strip() or not quantity.strip():
                raise InvalidInput(f"--map {item!r}: expected COLUMN=QUANTITY, e.g. kl=k3")
            pairs.append((column.strip(), quantity.strip()))
    out: dict[str, str | None] = {}
    for column, quantity in pairs:
        if quantity.lower() in NONE_QUANTITIES:
            out[column] = None
            continue
        if quantity not in STEP_QUANTITIES:
            raise InvalidInput(
                f"--map {column}={quantity}: {quantity!r} is not a klmon quantity; use one of "
                f"{', '.join(STEP_QUANTITIES)} (or - to keep the column only as a metric)"
            )
        out[column] = quantity
    return out


def locate(path: str | Path) -> Path:
    """The file to read: ``path`` itself, or the trainer_state.json in a directory (the one
    of its latest ``checkpoint-N`` when there are several)."""
    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"{p}: no such file or directory")
    if p.is_file():
        return p
    if (p / "trainer_state.json").is_file():
        return p / "trainer_state.json"
    found = sorted(p.glob("checkpoint-*/trainer_state.json"), key=_checkpoint_number)
    if found:
        return found[-1]
    raise InvalidInput(
        f"{p}: a directory without trainer_state.json (or checkpoint-N/trainer_state.json); "
        "give the log file itself"
    )


def _checkpoint_number(p: Path) -> int:
    m = re.search(r"checkpoint-(\d+)$", p.parent.name)
    return int(m.group(1)) if m else -1


_SUFFIXES = (".trainer_state", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")


def default_run_name(path: str | Path) -> str:
    """A run name from the file or directory: ``ppo.jsonl`` -> ``ppo``,
    ``out/checkpoint-250/trainer_state.json`` -> ``out``, ``gemma.trainer_state.json`` ->
    ``gemma``."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    name = p.name
    if name == "trainer_state.json":
        parent = p.resolve().parent
        if re.fullmatch(r"checkpoint-\d+", parent.name) and parent.parent.name:
            return parent.parent.name
        return parent.name or "trainer_state"
    for _ in range(2):
        for suffix in (*_SUFFIXES, ".log", ".txt", ".out"):
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
    return name


def prepare_path(
    path: str | Path,
    *,
    fmt: str | None = None,
    mapping: Mapping[str, str | None] | None = None,
    progress: Progress | None = None,
) -> tuple[Path, Prepared]:
    """Read a log into memory (no database): the file read and what would be written."""
    file = locate(path)
    if fmt in (None, "auto"):
        fmt = detect_format(file)
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)} or auto")
    total = file_size(file)
    tick = (lambda done: progress("read", done, total)) if progress else (lambda _d: None)
    try:
        mtime = file.stat().st_mtime
    except OSError:
        mtime = time.time()
    try:
        prepared = FORMATS[fmt].prepare(
            file, tick, default_wall_time=mtime, user_map=dict(mapping or {})
        )
    except OSError as exc:
        raise InvalidInput(f"{file}: cannot read ({exc.strerror or exc})") from exc
    if not prepared.steps and not prepared.metrics:
        first = f" (first: {prepared.problems[0]})" if prepared.problems else ""
        raise InvalidInput(
            f"{file}: no steps could be read as {FORMATS[fmt].title}; "
            f"{len(prepared.problems)} lines skipped{first}"
        )
    return file, prepared


def import_path(
    db: Database,
    path: str | Path,
    *,
    project: str | None = None,
    name: str | None = None,
    fmt: str | None = None,
    mapping: Mapping[str, str | None] | None = None,
    config: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import a training log into run (project, name); see the module docstring.

    ``mapping``: column -> klmon quantity (or None: keep only as a metric), as parsed by
    :func:`parse_map`. ``config``: extra run config entries (``--config key=value``).
    """
    file, prepared = prepare_path(path, fmt=fmt, mapping=mapping, progress=progress)
    project = project or DEFAULT_PROJECT
    name = name or default_run_name(path)
    run_config = dict(prepared.config)
    run_config["import"] = {
        "file": file.name,
        "format": prepared.fmt,
        "producer": prepared.producer,
        **({"map": dict(mapping)} if mapping else {}),
    }
    run_config.update(config or {})
    return write_prepared(
        db,
        prepared,
        project=project,
        name=name,
        config=run_config,
        path=str(file),
        progress=progress,
    )


def write_prepared(
    db: Database,
    prepared: Prepared,
    *,
    project: str,
    name: str,
    config: dict[str, Any],
    path: str,
    progress: Progress | None = None,
) -> ImportReport:
    """Write what :func:`prepare_path` read into run (project, name)."""
    existing = find_run_by_name(db, project, name)
    run = existing or get_or_create_run(
        db,
        project,
        name,
        config=config,
        source=f"import:{prepared.fmt}",
        status="finished",
    )
    if existing is None:
        set_run_status(db, run.id, "finished")
    report = ImportReport(
        path=path,
        format=prepared.fmt,
        producer=prepared.producer,
        run=run,
        created=existing is None,
        steps_read=len(prepared.steps),
        metrics_read=len(prepared.metrics),
        problems=prepared.problems,
        notes=list(prepared.notes),
        mapping=prepared.mapping,
    )
    stored_steps: set[int] = set()
    stored_metrics: dict[tuple[int, str], float | None] = {}
    if existing is not None:
        stored_steps, stored_metrics = _stored(db, run.id)

    # progress counts rows written: steps, then metrics
    n_steps, total = len(prepared.steps), len(prepared.steps) + len(prepared.metrics)
    conflicts: list[int] = []
    for start in range(0, n_steps, STEP_BATCH):
        batch = prepared.steps[start : start + STEP_BATCH]
        result = write_steps(db, run.id, batch)
        report.steps_inserted += result.inserted
        report.steps_unchanged += result.duplicates
        conflicts.extend(result.conflicts)
        if progress:
            progress("write", start + len(batch), total)
    report.step_conflicts = tuple(conflicts)

    new_metrics = prepared.metrics
    if stored_metrics:  # a re-import: only what is not stored yet goes to the database
        new_metrics = []
        for step, metric, value in prepared.metrics:
            key = (step, metric)
            if key not in stored_metrics:
                new_metrics.append((step, metric, value))
            elif _same(stored_metrics[key], value):
                report.metrics_unchanged += 1
            else:
                report.metric_conflicts.append(key)
    done = n_steps + len(prepared.metrics) - len(new_metrics)
    for start in range(0, len(new_metrics), METRIC_BATCH):
        batch_m = new_metrics[start : start + METRIC_BATCH]
        report.metrics_inserted += write_metrics(db, run.id, batch_m)
        if progress:
            progress("write", done + start + len(batch_m), total)
    write_metric_info(db, run.id, prepared.infos)

    new_steps = [s for s in prepared.samples if s not in stored_steps]
    if prepared.histograms:
        report.histograms_inserted = write_histograms(db, run.id, prepared.histograms)
    samples = [s for step in new_steps for s in prepared.samples[step]]
    if samples:
        report.samples_inserted = write_samples(db, run.id, samples)
    if report.steps_inserted:
        # An imported run is complete: pay its chart rollups now, not on the first page view.
        refresh_rollups(db, run.id)
    return report


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))


def _stored(db: Database, run_id: int) -> tuple[set[int], dict[tuple[int, str], float | None]]:
    with db.begin() as conn:
        steps = {
            int(r[0])
            for r in conn.execute(text("SELECT step FROM steps WHERE run_id = :r"), {"r": run_id})
        }
        metrics = {
            (int(r[0]), r[1]): r[2]
            for r in conn.execute(
                text("SELECT step, name, value FROM metrics WHERE run_id = :r"), {"r": run_id}
            )
        }
    return steps, metrics
