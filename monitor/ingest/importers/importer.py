"""``import_path``: read a log, then write its run, steps, metrics and meanings, idempotently.

A run holds one source, identified by the SHA-256 of the file (kept in the run config under
``import.source``). The run is found by (project, name): importing the same file again goes
into the same run, and steps and metrics go in with ``ON CONFLICT DO NOTHING``
(``write_steps``/``write_metrics``), so it changes nothing (a different ``--map`` may make a
step differ: a conflict, reported, the stored value kept). Another file is never added to a
run: under the default name it goes into a run of its own (the name plus the start of its
fingerprint, said in the summary); under a ``--run`` name that holds another source it is
refused. An import that fails midway removes the run it created (its rows go with it), on
SQLite and PostgreSQL alike; the run stays ``running`` until the last row is in.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import Problem, file_size
from monitor.ingest.importers.detect import detect_format
from monitor.ingest.importers.registry import FORMATS, ReadOptions
from monitor.ingest.importers.tables import CountedNotes, Prepared
from monitor.store import (
    STEP_QUANTITIES,
    Database,
    RunInfo,
    delete_run,
    find_run_by_name,
    get_or_create_run,
    get_run,
    refresh_ledger_rollups,
    set_run_status,
    write_histograms,
    write_imported_ledgers,
    write_metric_columns,
    write_metric_info,
    write_metrics,
    write_samples,
    write_step_frame,
    write_steps,
)

DEFAULT_PROJECT = "imported"
# step sources that are the format's own (the summary names them, not a column)
FORMAT_STEP_SOURCES = ("the order of the Trainer's printed dicts", "step:N of each line")
MAX_PROBLEMS = 1_000  # skipped lines kept for the summary (all are counted)
STEP_BATCH = 5_000
METRIC_BATCH = 50_000
FRAME_BATCH = 50_000  # step rows per transaction of a columnar import (a progress tick each)
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
    ledgers_inserted: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict[str, list[str]] = field(default_factory=dict)
    problems_total: int = 0
    step_column: str | None = None
    step_source: str = "row order"
    kl_read: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    kl_candidates: list[str] = field(default_factory=list)
    # the default run name that held another file (this one went into ``run``)
    renamed_from: str | None = None

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
                + (f", token ledgers: {self.ledgers_inserted}" if self.ledgers_inserted else "")
            )
        if self.renamed_from:
            lines.append(
                f"note: run {r.project}/{self.renamed_from} holds another file, so this one "
                f"went into a run of its own, {r.project}/{r.name} (--run NAME to choose)"
            )
        if self.step_column and self.step_source in FORMAT_STEP_SOURCES:
            lines.append(f"step from {self.step_source}")
        elif self.step_column:
            lines.append(f"step from column {self.step_column} ({self.step_source})")
        else:
            lines.append("step from row order (no step column found; name one with --step-column)")
        kl = Prepared(fmt=self.format, producer=self.producer)
        kl.kl_read, kl.kl_candidates, kl.mapping = self.kl_read, self.kl_candidates, self.mapping
        lines.extend(kl.kl_lines())
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
        skipped = max(self.problems_total, len(self.problems))
        lines.append(f"{skipped} lines skipped" + (" (first shown):" if self.problems else ""))
        lines.extend(f"  {p}" for p in self.problems[:max_problems])
        if skipped > max_problems:
            lines.append(f"  ... and {skipped - max_problems} more")
        return lines


def _few(steps: tuple[int, ...], n: int = 8) -> str:
    return ", ".join(map(str, steps[:n])) + (" ..." if len(steps) > n else "")


def parse_map(items: Mapping[str, str] | list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """``["kl_vs_ref=kl_mean", "kl=-"]`` -> ``{"kl_vs_ref": "kl_mean", "kl": None}``.

    QUANTITY must be a klmon step column, ``step`` (the column holding the step, as
    ``--step-column``) or ``-`` (keep the column only as a metric).
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
        if quantity not in STEP_QUANTITIES and quantity != "step":
            raise InvalidInput(
                f"--map {column}={quantity}: {quantity!r} is not a klmon quantity; use one of "
                f"{', '.join(STEP_QUANTITIES)}, step (the step column), or - to keep the "
                "column only as a metric"
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
        folder = p.resolve()
        if re.fullmatch(r"checkpoint-\d+", folder.name) and folder.parent.name:
            return folder.parent.name  # out/checkpoint-250 -> out, like its trainer_state.json
        return folder.name
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
    step_column: str | None = None,
) -> tuple[Path, Prepared]:
    """Read a log into memory (no database): the file read and what would be written."""
    file, fmt = _resolve(path, fmt)
    total = file_size(file)
    tick = (lambda done: progress("read", done, total)) if progress else (lambda _d: None)
    try:
        prepared = FORMATS[fmt].prepare(file, tick, _options(file, mapping, step_column))
    except OSError as exc:
        raise InvalidInput(f"{file}: cannot read ({exc.strerror or exc})") from exc
    _require_rows(file, fmt, prepared)
    return file, prepared.as_rows()


def _options(
    file: Path, mapping: Mapping[str, str | None] | None, step_column: str | None
) -> ReadOptions:
    return ReadOptions(
        default_wall_time=_mtime(file), user_map=dict(mapping or {}), step_column=step_column
    )


def _resolve(path: str | Path, fmt: str | None) -> tuple[Path, str]:
    file = locate(path)
    if fmt in (None, "auto"):
        fmt = detect_format(file)
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)} or auto")
    return file, fmt


def _mtime(file: Path) -> float:
    try:
        return file.stat().st_mtime
    except OSError:
        return time.time()


def _require_rows(file: Path, fmt: str, prepared: Prepared, skipped: int | None = None) -> None:
    """The file is refused only when nothing in it could be read."""
    if prepared.n_steps or prepared.n_metrics:
        return
    n = len(prepared.problems) if skipped is None else skipped
    first = f" (first: {prepared.problems[0]})" if prepared.problems else ""
    raise InvalidInput(
        f"{file}: no steps could be read as {FORMATS[fmt].title}; {n} lines skipped{first}"
    )


def fingerprint(file: Path) -> str:
    """What identifies a source: the SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


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
    step_column: str | None = None,
) -> ImportReport:
    """Import a training log into run (project, name); see the module docstring.

    ``mapping``: column -> klmon quantity (or None: keep only as a metric; ``step``: the
    step column), as parsed by :func:`parse_map`. ``config``: extra run config entries
    (``--config key=value``). ``step_column``: the column holding the step.
    """
    file, fmt = _resolve(path, fmt)
    total = file_size(file)
    writing = False

    def tick(done: int) -> None:
        # a batched read goes on while rows are written: then only the writing is shown
        if progress and not writing:
            progress("read", done, total)

    try:
        source = fingerprint(file)
        chunks = FORMATS[fmt].chunks(file, tick, _options(file, mapping, step_column))
        first = next(chunks)
    except OSError as exc:
        raise InvalidInput(f"{file}: cannot read ({exc.strerror or exc})") from exc
    project = project or DEFAULT_PROJECT
    run_name, existing, renamed_from = _choose_run(db, project, name, path, source)
    run_config = dict(first.config)
    run_config["import"] = {
        "file": file.name,
        "format": first.fmt,
        "producer": first.producer,
        "source": source,
        "step_column": first.step_column,
        "kl": [
            {"column": c, "quantity": q, "estimator": e, "unit": u} for c, q, e, u in first.kl_read
        ],
        **({"map": dict(mapping)} if mapping else {}),
    }
    run_config.update(config or {})
    if existing is None and FORMATS[fmt].read_batches is None:
        _require_rows(file, fmt, first)  # refused before a run exists
    writer = _Writer(db, project, run_name, existing, run_config, str(file), progress)
    writing = True
    try:
        report = writer.write(first, chunks, renamed_from)
        if report.steps_read == 0 and report.metrics_read == 0:
            _require_rows(file, fmt, first, report.problems_total)
    except BaseException:
        writer.discard()
        raise
    return report


def _choose_run(
    db: Database, project: str, name: str | None, path: str | Path, source: str
) -> tuple[str, RunInfo | None, str | None]:
    """The run a source goes into: (name, the existing run or None, the default name it
    was moved from). A run holds one source: the same file again goes into its own run (a
    no-op); another file never goes into it. Under the default name, another file gets the
    name plus the start of its fingerprint; under a name given with --run, it is refused."""
    wanted = name or default_run_name(path)
    existing = find_run_by_name(db, project, wanted)
    if existing is None or _source_of(existing) == source:
        return wanted, existing, None
    held = _describe_source(existing)
    if name is not None:
        raise InvalidInput(
            f"run {project}/{wanted} already holds {held}; this file ({source[:19]}...) would "
            "mix two sources in one run: import it under another --run name"
        )
    alt = f"{wanted}-{source.split(':', 1)[1][:8]}"
    other = find_run_by_name(db, project, alt)
    if other is not None and _source_of(other) != source:
        raise InvalidInput(
            f"runs {project}/{wanted} and {project}/{alt} already hold other sources; "
            "import this file under another --run name"
        )
    return alt, other, wanted


def _source_of(run: RunInfo) -> str | None:
    info = run.config.get("import")
    return info.get("source") if isinstance(info, dict) else None


def _describe_source(run: RunInfo) -> str:
    info = run.config.get("import")
    if not isinstance(info, dict):
        return f"a {run.source} run"
    if info.get("source"):
        return f"another file ({info.get('file')}, {str(info['source'])[:19]}...)"
    return f"an earlier import of {info.get('file')} (no fingerprint recorded)"


class _Writer:
    """Writes an import's batches into one run; :meth:`discard` removes a run it created."""

    def __init__(
        self,
        db: Database,
        project: str,
        name: str,
        existing: RunInfo | None,
        config: dict[str, Any],
        path: str,
        progress: Progress | None,
    ) -> None:
        self.db, self.project, self.name, self.existing = db, project, name, existing
        self.config, self.path, self.progress = config, path, progress
        self.run: RunInfo | None = existing
        self.written = 0

    def write(
        self, first: Prepared, rest: Iterator[Prepared], renamed_from: str | None
    ) -> ImportReport:
        db = self.db
        if self.run is None:
            # "running" while rows go in: an import killed midway is not shown as complete,
            # and importing the same file again completes it.
            self.run = get_or_create_run(
                db,
                self.project,
                self.name,
                config=self.config,
                source=f"import:{first.fmt}",
                status="running",
            )
        run = self.run
        report = ImportReport(
            path=self.path,
            format=first.fmt,
            producer=first.producer,
            run=run,
            created=self.existing is None,
            mapping={},
            step_column=first.step_column,
            step_source=first.step_source,
            kl_candidates=first.kl_candidates,
            renamed_from=renamed_from,
        )
        counted = CountedNotes()
        for chunk in itertools.chain([first], rest):
            self._write_chunk(report, chunk)
            counted.add(chunk.counted)
        report.notes.extend(counted.notes())  # the file's counts, not a batch's
        if not report.kl_read:
            report.kl_candidates = first.kl_candidates
        if report.ledgers_inserted:
            # Ledger rollups of a long run take far longer than a chart's (top ids per
            # bucket, not three numbers): paid here, not on the first view of the panel.
            refresh_ledger_rollups(db, run.id)
        if run.status != "finished":
            set_run_status(db, run.id, "finished")
            report.run = get_run(db, run.id)
        return report

    def _write_chunk(self, report: ImportReport, prepared: Prepared) -> None:
        db, run = self.db, self.run
        assert run is not None
        report.steps_read += prepared.n_steps
        report.metrics_read += prepared.n_metrics
        report.problems_total += len(prepared.problems)
        room = MAX_PROBLEMS - len(report.problems)
        report.problems.extend(prepared.problems[: max(0, room)])
        report.notes.extend(n for n in prepared.uncounted_notes() if n not in report.notes)
        for q, cols in prepared.mapping.items():
            have = report.mapping.setdefault(q, [])
            have.extend(c for c in cols if c not in have)
        report.kl_read.extend(k for k in prepared.kl_read if k not in report.kl_read)
        if prepared.step_frame is not None:
            self._write_columns(report, prepared)
            return
        stored_steps: set[int] = set()
        stored_metrics: dict[tuple[int, str], float | None] = {}
        if self.existing is not None and prepared.steps:
            lo = min(r["step"] for r in prepared.steps)
            hi = max(r["step"] for r in prepared.steps)
            from monitor.store import stored_between  # a reader, with pandas: the row path

            stored_steps, stored_metrics = stored_between(db, run.id, lo, hi)

        total = len(prepared.steps) + len(prepared.metrics)
        conflicts = list(report.step_conflicts)
        for start in range(0, len(prepared.steps), STEP_BATCH):
            batch = prepared.steps[start : start + STEP_BATCH]
            result = write_steps(db, run.id, batch)
            report.steps_inserted += result.inserted
            report.steps_unchanged += result.duplicates
            conflicts.extend(result.conflicts)
            self._tick(len(batch), total)
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
        self._tick(len(prepared.metrics) - len(new_metrics), total)
        for start in range(0, len(new_metrics), METRIC_BATCH):
            batch_m = new_metrics[start : start + METRIC_BATCH]
            report.metrics_inserted += write_metrics(db, run.id, batch_m)
            self._tick(len(batch_m), total)
        write_metric_info(db, run.id, prepared.infos)

        new_steps = [s for s in prepared.samples if s not in stored_steps]
        if prepared.histograms:
            report.histograms_inserted += write_histograms(db, run.id, prepared.histograms)
        if prepared.ledgers:
            report.ledgers_inserted += write_imported_ledgers(
                db, run.id, prepared.ledgers, prepared.token_texts
            )
        samples = [s for step in new_steps for s in prepared.samples[step]]
        if samples:
            report.samples_inserted += write_samples(db, run.id, samples)

    def _write_columns(self, report: ImportReport, prepared: Prepared) -> None:
        """A columnar chunk (``tables.build_frame``): step rows ``FRAME_BATCH`` at a time,
        each metric as arrays; the store counts replays and conflicts."""
        db, run, frame = self.db, self.run, prepared.step_frame
        assert run is not None and frame is not None
        total = prepared.n_steps + prepared.n_metrics
        conflicts = list(report.step_conflicts)
        for start in range(0, prepared.n_steps, FRAME_BATCH):
            part = {c: v[start : start + FRAME_BATCH] for c, v in frame.items()}
            result = write_step_frame(db, run.id, part)
            report.steps_inserted += result.inserted
            report.steps_unchanged += result.duplicates
            conflicts.extend(result.conflicts)
            self._tick(len(part["step"]), total)
        report.step_conflicts = tuple(conflicts)
        for group in _metric_groups(prepared.metric_columns):
            written = write_metric_columns(db, run.id, group)
            report.metrics_inserted += written.inserted
            report.metrics_unchanged += written.duplicates
            report.metric_conflicts.extend(written.conflicts)
            self._tick(sum(len(steps) for steps, _ in group.values()), total)
        write_metric_info(db, run.id, prepared.infos)

    def _tick(self, n: int, total: int) -> None:
        self.written += n
        if self.progress:
            self.progress("write", self.written, max(total, self.written))

    def discard(self) -> None:
        """Remove the run this import created (its rows go with it): a failed import leaves
        nothing behind. A run that existed before is left as it was found."""
        if self.existing is not None or self.run is None:
            return
        try:
            delete_run(self.db, self.run.id)
        except Exception:  # the import's own error is the one to report
            return


def _metric_groups(
    columns: Mapping[str, tuple[Any, Any]],
) -> Iterator[dict[str, tuple[Any, Any]]]:
    """The metric columns of a chunk, a few at a time: as many as hold ``METRIC_BATCH``
    values (one transaction and progress tick each; a column longer than that goes alone).
    The short columns of a batched read then share a transaction, and PostgreSQL gets
    their blocks by COPY instead of an INSERT per column."""
    group: dict[str, tuple[Any, Any]] = {}
    size = 0
    for name, column in columns.items():
        n = len(column[0])
        if group and size + n > METRIC_BATCH:
            yield group
            group, size = {}, 0
        group[name] = column
        size += n
    if group:
        yield group


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))
