"""Replay spool files left behind by processes that died (``klmon sync``).

Each file names its run in its first record, so a file can be replayed into a database that
has never heard of the run (the run is then created). Replays are idempotent: steps already
stored are counted as such and left alone; a step stored with a different payload is a
conflict, counted and never overwritten. Damaged records are reported and skipped; the rest of
the file is replayed. A record the database refuses goes to a dead-letter file next to the
spool file (``*.klspool-dead``) and the rest goes on. Files whose writer is still alive (it
holds their lock) are skipped. Only an unreachable database stops sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.errors import DatabaseUnavailable, SchemaOutOfDate
from monitor.ingest.apply import apply_isolated, ensure_run
from monitor.ingest.spool import (
    DEAD_SUFFIX,
    CorruptRecord,
    DeadLetterFile,
    FileLock,
    SpoolRecord,
    iter_records,
    spool_files,
)
from monitor.ingest.text import clean_text
from monitor.store import Database, find_run_by_name, set_run_status

LIVENESS_SLACK_S = 1.0
"""A run still 'running' whose last sign of life is no later than this after the last record
of a dead writer (rank 0) that left no final status is marked 'crashed' by sync: nobody has
written to it since that process died."""


@dataclass
class FileReport:
    """What sync did with one spool file."""

    path: Path
    run: str | None = None
    rank: int = 0
    records: int = 0
    steps: int = 0
    inserted: int = 0
    duplicates: int = 0
    already_committed: int = 0
    conflicts: list[int] = field(default_factory=list)
    rejected: int = 0
    corrupt: list[CorruptRecord] = field(default_factory=list)
    created_run: bool = False
    dead_letter: int = 0
    dead_letter_path: Path | None = None
    status: str | None = None
    action: str = "skipped"
    reason: str | None = None

    def describe(self) -> str:
        if self.action == "skipped":
            return clean_text(f"{self.path.name}: skipped ({self.reason})")
        parts = [
            f"{self.path.name}: {self.run} (rank {self.rank}): {self.steps} steps: "
            f"{self.inserted} new, {self.duplicates + self.already_committed} already stored, "
            f"{len(self.conflicts)} conflicts"
        ]
        if self.rejected:
            parts.append(f"{self.rejected} rejected steps")
        if self.dead_letter:
            where = self.dead_letter_path.name if self.dead_letter_path else "?"
            parts.append(f"{self.dead_letter} records refused by the database, kept in {where}")
        if self.conflicts:
            parts.append("conflicting steps " + ", ".join(map(str, self.conflicts[:10])))
        for c in self.corrupt:
            parts.append(f"damaged record at byte {c.offset} skipped ({c.reason})")
        if self.created_run:
            parts.append("run created (the database did not know it)")
        if self.status:
            parts.append(f"status -> {self.status}")
        parts.append(self.action)
        return clean_text("; ".join(parts))


def sync_spool(
    db: Database,
    directory: str | Path,
    *,
    keep: bool = False,
    dry_run: bool = False,
    batch: int = 2000,
) -> list[FileReport]:
    """Replay every spool file in ``directory`` whose writer is gone. A replayed file is
    deleted (``keep``: left in place); one with damaged records is renamed ``*.corrupt`` so
    the damage can be inspected and is not replayed again. ``dry_run``: read and report only.
    """
    reports: list[FileReport] = []
    finals: dict[tuple[str, str, str], tuple[dict[str, Any], bool, float]] = {}
    for path in spool_files(directory):
        lock = FileLock(path)
        if not lock.acquire():
            reports.append(FileReport(path, reason="in use by a running process (or already gone)"))
            continue
        try:
            try:
                report, header, saw_status, last = _sync_file(
                    db, path, batch=batch, dry_run=dry_run
                )
            except (DatabaseUnavailable, SchemaOutOfDate):
                raise
            except Exception as exc:  # this file's data: report it, keep it, go on
                reason = f"not replayed (kept): {type(exc).__name__}: {exc}".splitlines()[0]
                reports.append(FileReport(path, reason=reason))
                continue
            reports.append(report)
            if header is not None and report.action != "skipped":
                key = (str(header["project"]), str(header["name"]), _writer_stem(path))
                prev = finals.get(key)
                finals[key] = (
                    header,
                    saw_status or (prev[1] if prev else False),
                    max(last, prev[2] if prev else 0.0),
                )
                if not dry_run:
                    report.action = _dispose(path, report, keep)
        finally:
            lock.release()
    if not dry_run:
        _mark_crashed(db, finals, reports)
    return reports


def _writer_stem(path: Path) -> str:
    # <project>.<name>.r<rank>.<host>.<pid>.<ms>.<segment>.klspool -> everything but segment
    return path.name.rsplit(".", 2)[0]


def _iter_file(path: Path) -> Iterator[SpoolRecord | CorruptRecord]:
    return iter_records(path)


def _sync_file(
    db: Database, path: Path, *, batch: int, dry_run: bool
) -> tuple[FileReport, dict[str, Any] | None, bool, float]:
    report = FileReport(path)
    header, good = _read_file(path, report)
    if header is None:
        report.reason = "no readable run record at the start: cannot tell which run it is"
        report.action = "skipped"
        if report.corrupt and not dry_run:
            _quarantine(path)
            report.reason += "; renamed *.corrupt"
        return report, None, False, 0.0
    report.run = f"{header['project']}/{header['name']}"
    report.rank = int(header.get("rank") or 0)
    todo, saw_status, last = _records_to_replay(report, header, good)
    report.records = len(good)
    if dry_run:
        report.action = "dry run"
        return report, header, saw_status, last
    _replay(db, path, report, header, todo, batch=batch)
    report.action = "replayed"
    return report, header, saw_status, last


def _read_file(path: Path, report: FileReport) -> tuple[dict[str, Any] | None, list[SpoolRecord]]:
    """The file's run record (its header) and its other readable records; damaged records
    are noted in ``report``."""
    header: dict[str, Any] | None = None
    good: list[SpoolRecord] = []
    for item in _iter_file(path):
        if isinstance(item, CorruptRecord):
            report.corrupt.append(item)
        elif item.record.get("type") == "run" and header is None:
            header = item.record
        else:
            good.append(item)
    return header, good


def _committed_upto(header: Mapping[str, Any], good: list[SpoolRecord]) -> int:
    """Records before the last commit marker of this segment are already in the database."""
    upto = 0
    for item in good:
        rec = item.record
        if rec.get("type") == "commit" and rec.get("seg") == header.get("segment"):
            upto = max(upto, int(rec.get("upto") or 0))
    return upto


def _records_to_replay(
    report: FileReport, header: Mapping[str, Any], good: list[SpoolRecord]
) -> tuple[list[dict[str, Any]], bool, float]:
    """The records still to write (steps counted in ``report``), whether the file holds a
    status record, and the time of its last record."""
    upto = _committed_upto(header, good)
    todo: list[dict[str, Any]] = []
    saw_status = False
    last = float(header.get("started_at") or 0.0)
    for item in good:
        rec = item.record
        kind = rec.get("type")
        last = max(last, float(rec.get("t") or 0.0))
        if kind == "commit" or kind == "run":
            continue
        if kind == "status":
            saw_status = True
        if kind in ("step", "raw"):
            report.steps += 1
            if item.end <= upto:
                report.already_committed += 1
                continue
        todo.append(rec)
    return todo, saw_status, last


def _replay(
    db: Database,
    path: Path,
    report: FileReport,
    header: dict[str, Any],
    todo: list[dict[str, Any]],
    *,
    batch: int,
) -> None:
    """Write ``todo`` to the file's run (created if the database does not know it) in chunks
    of ``batch``; records the database refuses go to the file's dead-letter file."""
    existed = find_run_by_name(db, str(header["project"]), str(header["name"]))
    run_id = ensure_run(db, header)
    report.created_run = existed is None
    dead = DeadLetterFile(path.with_name(path.name.removesuffix(".klspool") + DEAD_SUFFIX))
    run = {k: header.get(k) for k in ("project", "name", "rank", "world_size")}

    def dead_letter(record: dict[str, Any], reason: str) -> None:
        dead.append(dict(record), reason, run)
        report.dead_letter += 1
        report.dead_letter_path = dead.path

    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        result = apply_isolated(db, run_id, header, chunk, dead_letter)
        report.inserted += result.ingest.inserted
        report.duplicates += result.ingest.duplicates
        report.conflicts.extend(result.ingest.conflicts)
        report.rejected += result.rejected
        if result.status:
            report.status = result.status


def _dispose(path: Path, report: FileReport, keep: bool) -> str:
    if keep:
        return "kept"
    if report.corrupt:
        _quarantine(path)
        return "renamed *.corrupt"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return "deleted"


def _quarantine(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rename(path.with_name(path.name + ".corrupt"))


def _mark_crashed(
    db: Database,
    finals: dict[tuple[str, str, str], tuple[dict[str, Any], bool, float]],
    reports: list[FileReport],
) -> None:
    """A rank-0 process whose spool ends without a final status died. If its run is still
    'running' and nothing has been heard from it since that process's last record, the run
    crashed (a resumed run has written since, and is left alone)."""
    for (project, name, _stem), (header, saw_status, last) in finals.items():
        if saw_status or int(header.get("rank") or 0) != 0:
            continue
        info = find_run_by_name(db, project, name)
        if info is None or info.status != "running":
            continue
        if info.last_seen_at > last + LIVENESS_SLACK_S:
            continue
        set_run_status(db, info.id, "crashed", now=max(info.last_seen_at, last))
        for r in reports:
            if r.run == f"{project}/{name}" and r.action != "skipped":
                r.status = "crashed"
