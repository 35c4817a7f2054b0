"""The committer thread of the background writer: it reads acknowledged records back from the
spool in batches and writes them to the database (``monitor.ingest.apply``), one transaction
per batch, keeping its place in the spool across outages (exponential backoff, then replay).
Records the spool could not take are written straight from memory (the direct path); records
the database refuses go to the dead-letter file; steps neither could keep are dropped and
counted. :class:`Committer` holds these methods; :class:`~monitor.ingest.writer.BackgroundWriter`
owns the state they share with the processor and starts the thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from monitor.errors import KlmonError, SchemaOutOfDate
from monitor.ingest.apply import ApplyResult, apply_isolated, ensure_run
from monitor.ingest.spool import (
    FILE_MAGIC,
    CorruptRecord,
    DeadLetterFile,
    SpoolRecord,
    SpoolWriter,
    iter_records,
)
from monitor.store import Database, set_run_status

if TYPE_CHECKING:
    from monitor.ingest.records import WriterConfig
    from monitor.ingest.writer import Stats

log = logging.getLogger("klmon.ingest")


class Committer:
    """The committer side of :class:`~monitor.ingest.writer.BackgroundWriter` (a base class of
    it): the state below is created by the writer and shared with its processor thread under
    ``_cond``."""

    header: dict[str, Any]
    db: Database
    spool: SpoolWriter
    cfg: WriterConfig
    stats: Stats
    run_id: int | None
    last_error: str | None
    _cond: threading.Condition
    _submitted: int
    _acked: int
    _pos: tuple[int, int]
    _in_outage: bool
    _replaying_until: tuple[int, int] | None
    _acked_steps: int
    _committed_steps: int
    _direct: collections.deque[tuple[dict[str, Any], int]]
    _direct_bytes: int
    _spool_error: str | None
    _warned_drop: bool
    _dead: DeadLetterFile
    _stopping: threading.Event
    _abandon: threading.Event
    _hurry: threading.Event
    _last_commit_mark: float
    _appended: dict[tuple[int, int], tuple[int, dict[str, Any]]]
    _appended_bytes: int

    # steps that cannot be kept -------------------------------------------------------------

    def _drop(self, n: int) -> None:
        if not n:
            return
        self.stats.add("dropped", n)
        with self._cond:
            first, self._warned_drop = not self._warned_drop, True
        if first:
            log.warning(
                "klmon: %d step(s) dropped so far: the spool cannot be written (%s) and the "
                "database %s does not take them; run.stats['dropped'] counts them",
                self.stats.snapshot()["dropped"],
                self._spool_error,
                self.db.safe_url,
            )

    def _dead_letter(self, record: Mapping[str, Any], reason: str) -> None:
        """A record the database refused: into the dead-letter file, counted, warned once."""
        run = {k: self.header.get(k) for k in ("project", "name", "rank", "world_size")}
        try:
            self._dead.append(dict(record), reason, run)
        except OSError as exc:
            log.error("klmon: could not write the dead-letter file %s: %s", self._dead.path, exc)
            self._drop(int(record.get("type") in ("step", "raw")))
            return
        n = self.stats.snapshot()["dead_letter"]
        self.stats.add("dead_letter")
        if n == 0:
            log.warning(
                "klmon: the database refused a record of step %s (%s): kept in %s, the steps "
                "around it go on (counted in run.stats['dead_letter'])",
                record.get("step"),
                reason,
                self._dead.path,
            )

    # committer ------------------------------------------------------------------------------

    def _commit_loop(self) -> None:
        backoff = self.cfg.backoff_initial
        while not self._abandon.is_set():
            with self._cond:
                while not self._has_uncommitted() and not self._drained():
                    if not self._cond.wait(0.5):
                        break  # a quiet half second: fsync (outside the lock), then wait again
                if not self._has_uncommitted() and self._drained():
                    return
                idle = not self._has_uncommitted()
            self.spool.maybe_fsync()
            if idle:
                continue
            if not self._stopping.is_set():
                # Let a few steps gather so one transaction carries several of them (each
                # transaction has a fixed cost: commit, metric blocks, run counters); a
                # ``flush()`` waiting for the database cuts the gathering short.
                self._hurry.wait(self.cfg.flush_interval)
                self._hurry.clear()
            try:
                self._commit_some()
            except KlmonError as exc:
                self._on_db_error(exc)
                self._abandon.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max)
                continue
            except Exception as exc:  # a driver error that escaped translation
                self._on_db_error(exc)
                self._abandon.wait(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max)
                continue
            backoff = self.cfg.backoff_initial

    def _drained(self) -> bool:
        """Stopping, and the processor has appended everything it was given."""
        return self._stopping.is_set() and self._acked >= self._submitted

    def _has_uncommitted(self) -> bool:
        seg, off = self._pos
        end_seg, end_off = self.spool.end()
        return bool(self._direct) or (seg, off) < (end_seg, end_off)

    def _on_db_error(self, exc: BaseException) -> None:
        self.stats.add("db_errors")
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not self._in_outage:
            self._in_outage = True
            with self._cond:
                waiting = self._acked_steps - self._committed_steps
            self.stats.add("spooled", waiting)
            if self._spool_error is None:
                where = f"in the spool {self.spool.directory}"
            else:
                where = "in memory, up to queue_bytes (the spool cannot be written)"
            log.warning(
                "klmon: database write failed (%s); steps wait %s and are written when it is back",
                msg,
                where,
            )
        elif isinstance(exc, SchemaOutOfDate) and self.last_error != msg:
            log.error("klmon: %s", msg)
        self.last_error = msg

    def _commit_some(self) -> None:
        if self.run_id is None:
            self.db_check()
            self.run_id = ensure_run(self.db, self.header)
            self._mark_running()
        self._commit_direct()
        while not self._abandon.is_set():
            seg, off = self._pos
            size, final = self.spool.segment_end(seg)
            if off >= size:
                if not final:
                    return
                self.spool.release(seg)
                self._pos = (seg + 1, len(FILE_MAGIC))
                continue
            path = self.spool.segment_path(seg)
            if path is None:  # pragma: no cover - released under us
                self._pos = (seg + 1, len(FILE_MAGIC))
                continue
            records, new_off = self._recall(seg, off, size)
            if not records:
                records, new_off = self._read_batch(path, off, size)
            steps = sum(1 for r in records if r.get("type") in ("step", "raw"))
            if records:
                result = apply_isolated(
                    self.db, self.run_id, self.header, records, self._dead_letter, self.cfg
                )
                if self._in_outage:
                    log.warning("klmon: database is back; replaying the spool")
                    self._in_outage = False
                    self._replaying_until = self.spool.end()
                self._count(result, steps, replayed=self._replaying_until is not None)
                if self._replaying_until is not None and (seg, new_off) >= self._replaying_until:
                    self._replaying_until = None
            with self._cond:
                self._pos = (seg, new_off)
                self._committed_steps += steps
                self._forget_before(self._pos)
                self._cond.notify_all()
            self._maybe_mark_commit(seg, new_off, steps)

    def _commit_direct(self) -> None:
        """Write the records the spool could not take, straight from memory."""
        with self._cond:
            records = [r for r, _ in self._direct]
        if not records:
            return
        assert self.run_id is not None
        result = apply_isolated(
            self.db, self.run_id, self.header, records, self._dead_letter, self.cfg
        )
        steps = sum(1 for r in records if r.get("type") in ("step", "raw"))
        self._count(result, steps, replayed=False)
        with self._cond:
            for _ in records:
                self._direct_bytes -= self._direct.popleft()[1]
            self._committed_steps += steps
            self._cond.notify_all()

    def db_check(self) -> None:
        # An empty database gets the schema; an older one is an error naming `klmon db
        # upgrade` while the steps wait in the spool.
        from monitor.store import ensure_schema

        with self.db.translate_errors():
            ensure_schema(self.db.engine)

    def _mark_running(self) -> None:
        assert self.run_id is not None
        from monitor.store import get_run

        info = get_run(self.db, self.run_id)
        if info.status != "running":  # a resumed run
            set_run_status(self.db, self.run_id, "running")

    # records as appended: the committer's usual source -------------------------------------

    def remember(self, where: tuple[int, int, int], record: dict[str, Any]) -> None:
        """Keep a record just appended to the spool at ``where`` (segment, start, end) for the
        committer, so that it need not read and decode it back (a step's record took ~1 ms of
        GIL time to decode). Past ``queue_bytes`` of them (the database is down or slow) the
        committer reads the spool instead: memory stays bounded."""
        seg, start, end = where
        with self._cond:
            if self._appended_bytes + (end - start) > self.cfg.queue_bytes:
                return
            self._appended[(seg, start)] = (end, record)
            self._appended_bytes += end - start

    def _recall(self, seg: int, off: int, size: int) -> tuple[list[dict[str, Any]], int]:
        """The records kept by :meth:`remember` that follow each other from ``(seg, off)`` up
        to ``size``, and the offset after them; none when the next record was not kept."""
        records: list[dict[str, Any]] = []
        if off == len(FILE_MAGIC):  # a segment's run record: nothing to write
            off = min(self.spool.after_header(seg), size)
        with self._cond:
            while len(records) < self.cfg.max_batch:
                hit = self._appended.get((seg, off))
                if hit is None or hit[0] > size:
                    break
                del self._appended[(seg, off)]
                self._appended_bytes -= hit[0] - off
                records.append(hit[1])
                off = hit[0]
        return records, off

    def _forget_before(self, pos: tuple[int, int]) -> None:
        """Drop kept records the committer has gone past (it read them from the spool)."""
        if not self._appended or min(self._appended) >= pos:
            return
        for key in [k for k in self._appended if k < pos]:
            end, _ = self._appended.pop(key)
            self._appended_bytes -= end - key[1]

    def _read_batch(self, path: Any, off: int, size: int) -> tuple[list[dict[str, Any]], int]:
        records: list[dict[str, Any]] = []
        pos = off
        end = min(size, off + self.cfg.max_batch_bytes)
        for item in iter_records(path, start=off, end=end):
            if isinstance(item, SpoolRecord):
                records.append(item.record)
                pos = item.end
                if len(records) >= self.cfg.max_batch:
                    break
            elif isinstance(item, CorruptRecord):
                if item.end >= end and end < size:
                    break  # cut by the read window: read it whole next time
                self._skip_damaged(path, item)
                pos = item.end
        if pos == off and end < size:  # one record larger than the window: read it whole
            for item in iter_records(path, start=off, end=size):
                if isinstance(item, SpoolRecord):
                    records.append(item.record)
                else:  # damaged (or beyond what a reader accepts): skip it, never spin on it
                    self._skip_damaged(path, item)
                pos = item.end
                break
        return records, pos

    def _skip_damaged(self, path: Any, item: CorruptRecord) -> None:
        self.stats.add("corrupt")
        log.error(
            "klmon: damaged spool record at %s:%d (%s): skipped", path, item.offset, item.reason
        )

    def _count(self, result: ApplyResult, steps: int, *, replayed: bool) -> None:
        ing = result.ingest
        self.stats.add("rejected", result.raw_rejected)
        self.stats.add("written", ing.inserted)
        self.stats.add("duplicates", ing.duplicates)
        if ing.conflicts:
            self.stats.add("conflicts", len(ing.conflicts))
            log.warning(
                "klmon: step(s) %s already stored with a different payload: refused",
                ", ".join(map(str, ing.conflicts[:10])),
            )
        if replayed:
            self.stats.add("replayed", steps)

    def _maybe_mark_commit(self, seg: int, off: int, steps: int) -> None:
        """Note in the spool how far it is in the database, so ``klmon sync`` after a crash
        skips what is already stored (at most once a second, and only after real steps)."""
        now = time.monotonic()
        if steps and now - self._last_commit_mark >= 1.0:
            self._last_commit_mark = now
            mark = {"type": "commit", "seg": seg, "upto": off}
            with contextlib.suppress(OSError):
                self.remember(self.spool.append(mark), mark)
