"""The live client's background writer: two daemon threads between the training loop and the
database, with the spool between them.

- The *processor* takes the copied arrays of each ``log_step`` from a bounded queue, computes
  the step summary (``monitor.divergence``), picks the drill-down samples, and appends one
  record to the spool. Once appended, a step is **acknowledged**: it survives the death of
  the process. The processor never touches the database, so a slow or down database never
  backs the queue up. If the training loop outruns the processor, load is shed in a fixed
  order (``sample_budget``): steps keep fewer drill-down samples while the queue fills; when
  it is full ``log_step`` waits a few ms for the processor to take a step (``SPILL_WAIT``),
  and if it takes none, *spills*: it appends the raw arrays to the spool itself (a few ms,
  no summary; the token strings of such a step are not kept) and the committer summarises
  that record later. Memory stays bounded and nothing is dropped.
- The *committer* takes acknowledged records in batches (as appended, kept in memory up to
  ``queue_bytes``; otherwise read back from the spool) and writes them
  to the database (``monitor.store.step_writes``), one transaction per batch. When the
  database fails it keeps its place in the spool, waits (exponential backoff) and replays
  from there when the database is back. Memory stays bounded during any outage: what has not
  been written waits on disk, not in memory. Fully written spool segments are deleted.

This module holds the caller side, the processor thread and the shutdown. The record building
is in ``monitor.ingest.records``, the committer thread in ``monitor.ingest.committer`` and
``apply_records`` (spool records -> database, shared with ``klmon sync``) in
``monitor.ingest.apply``; the names other modules import from here stay importable here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from monitor.ingest.apply import (
    ApplyResult,
    apply_isolated,
    apply_records,
    ensure_run,
    to_step_record,
)
from monitor.ingest.committer import Committer
from monitor.ingest.records import (
    STEP_VALUES_MAX,
    ControlItem,
    StepItem,
    WriterConfig,
    item_bytes,
    item_from_raw,
    raw_record,
    record_bytes,
    scalar_step_record,
    smaller_record,
    summarize_item,
)
from monitor.ingest.spool import (
    DEAD_SUFFIX,
    FILE_MAGIC,
    DeadLetterFile,
    RecordTooLarge,
    SpoolWriter,
)
from monitor.store import Database

log = logging.getLogger("klmon.ingest")

SPILL_MAX_BYTES = 64 * 1024 * 1024
"""A step whose arrays exceed this is never spilled raw to the spool (the record would be too
big to read back cheaply): when the queue is full it is summarised on the caller's thread."""


SHED_RANDOM_AT = 0.25
"""Load shedding, step 1: when the steps waiting for the processor fill this share of the
queue (``queue_size`` or ``queue_bytes``, whichever is fuller), a step keeps only its
highest-KL samples (``samples_top``), not the random ones."""
SHED_SAMPLES_AT = 0.5
"""Step 2: from this share on, a step keeps no samples (its summary, histogram and metrics
are stored as always). Step 3, a full queue: ``log_step`` waits up to ``SPILL_WAIT`` for the
processor to take a step, and if it takes none, spills the raw step to the spool (counted
in ``spilled``; summarised later, with their samples)."""
SPILL_WAIT = 0.005
"""Seconds a ``log_step`` that finds the queue full waits (without the GIL) for the processor
to take a step, about what one takes, before spilling instead. A spill costs the loop about
as much (checksum and write of the raw arrays), and the background more later (read back
and summarised): with the wait, a loop that outruns the writer is slowed to its pace rather
than spilling a third of its steps (``bench_ingest.py`` back to back, load 2 on 2 CPUs: 0
spilled and p99 4-5 ms, against 60-90 spilled and p99 8-28 ms). Every such call waits:
spilling at once after a wait in vain spilled more (the spills' GIL time slowed the
processor further)."""


def sample_budget(cfg: WriterConfig, waiting: int, waiting_bytes: int) -> tuple[int, int]:
    """(samples_top, samples_random) for the step the processor takes while ``waiting`` steps
    (``waiting_bytes`` of arrays) wait behind it: the load-shedding order above."""
    fill = max(waiting / cfg.queue_size, waiting_bytes / cfg.queue_bytes)
    if fill >= SHED_SAMPLES_AT:
        return 0, 0
    if fill >= SHED_RANDOM_AT:
        return cfg.samples_top, 0
    return cfg.samples_top, cfg.samples_random


STATS_KEYS = (
    "logged",  # log_step / log_metrics calls accepted (rejected steps included)
    "acknowledged",  # records appended to the spool (durable against a crash of the process)
    "written",  # step rows (or rank shards) newly stored in the database
    "spooled",  # records that had to wait in the spool because a database write failed
    "replayed",  # of those, records written once the database came back
    "duplicates",  # exact replays of stored steps: no-ops
    "conflicts",  # a different payload for a stored (run, step): refused, never overwritten
    "rejected",  # invalid steps stored as status 'rejected' (on_invalid='log')
    "out_of_order",  # steps logged with a number lower than an earlier one (accepted)
    "thinned",  # steps stored with fewer drill-down samples because the writer was behind
    "samples_shed",  # the drill-down samples those steps did not keep
    "spilled",  # steps written raw to the spool by log_step because the queue was full
    "db_errors",  # failed database attempts (each retried)
    "corrupt",  # damaged spool records skipped
    "dropped",  # steps lost: the spool could not be written and the database did not take them
    "dead_letter",  # records the database refused, kept in the dead-letter file
)


class Stats:
    """Counters of a Run, safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(STATS_KEYS, 0)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


# --- the two threads ------------------------------------------------------------------------


class BackgroundWriter(Committer):
    """Processor and committer threads of one Run (see the module doc)."""

    def __init__(
        self,
        *,
        header: dict[str, Any],
        db: Database,
        spool: SpoolWriter,
        cfg: WriterConfig,
        stats: Stats,
    ) -> None:
        self.header = header
        self.db = db
        self.spool = spool
        self.cfg = cfg
        self.stats = stats
        self.run_id: int | None = None
        self.last_error: str | None = None
        # Bounded by items and by bytes (the copied arrays): past either, log_step spills.
        # SimpleQueue: its put is one C call (Queue.put runs a Python Condition on the
        # caller's thread); the bounds are checked in submit.
        self._queue: queue.SimpleQueue[tuple[StepItem | ControlItem | None, int]] = (
            queue.SimpleQueue()
        )
        self._queued_bytes = 0
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._room = threading.Condition(lock)  # the processor took an item off the queue
        self._submitted = 0
        self._acked = 0
        self._pos = (spool.segment, len(FILE_MAGIC))  # committer's place in the spool
        self._in_outage = False
        self._replaying_until: tuple[int, int] | None = None
        self._acked_steps = 0
        self._committed_steps = 0
        # Records the spool could not take (disk full): written straight to the database.
        self._direct: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._direct_bytes = 0
        self._spool_error: str | None = None
        self._warned_drop = False
        self._dead = DeadLetterFile(spool.directory / f"{spool.stem}{DEAD_SUFFIX}")
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._hurry = threading.Event()  # a caller waits for the database: commit now
        self._warned_processor = False
        self._warned_thin = False
        self._last_commit_mark = 0.0
        self._appended: dict[tuple[int, int], tuple[int, dict[str, Any]]] = {}
        self._appended_bytes = 0
        self._processor = threading.Thread(
            target=self._process_loop, name="klmon-processor", daemon=True
        )
        self._committer = threading.Thread(
            target=self._commit_loop, name="klmon-committer", daemon=True
        )
        self._processor.start()
        self._committer.start()

    # caller side ------------------------------------------------------------------------------

    def submit(self, item: StepItem | ControlItem) -> None:
        """Hand an item to the processor; never blocks on the database. If the queue is full
        (the processor is behind), wait up to ``SPILL_WAIT`` for room, then spill: append the
        raw record to the spool right here, so memory stays bounded and nothing is dropped."""
        size = item_bytes(item)
        with self._cond:
            self._submitted += 1
            full = self._full(size)
            if full:  # the processor is behind: give it SPILL_WAIT to take a step first
                deadline = time.monotonic() + SPILL_WAIT
                while full and (left := deadline - time.monotonic()) > 0:
                    self._room.wait(left)
                    full = self._full(size)
            if not full:
                self._queued_bytes += size
        if not full:
            self._queue.put((item, size))
        elif size > SPILL_MAX_BYTES:
            # Too big to spill raw: summarise it here (bounded: ~0.1 s for 2**25 values).
            self._append(summarize_item(item, self.header, self.cfg), caller=True)
        else:
            self._spill(item)

    def _full(self, size: int) -> bool:
        """Whether a step of ``size`` bytes finds the queue full (a step larger than the whole
        byte budget still goes in when the queue is empty). Under ``self._cond``."""
        over = self._queued_bytes + size > self.cfg.queue_bytes and self._queued_bytes > 0
        return (self._queue.qsize() >= self.cfg.queue_size or over) and size > 0

    def _spill(self, item: StepItem | ControlItem) -> None:
        if isinstance(item, ControlItem):
            record = item.record
        elif item.rejected is not None or item.policy_logprobs is None:
            record = summarize_item(item, self.header, self.cfg)  # no arrays: cheap
        else:
            record = raw_record(item, int(self.header.get("rank", 0)), self.cfg.vocabulary)
            self.stats.add("spilled")
            if not self._warned_processor:
                self._warned_processor = True
                log.warning(
                    "klmon: the training loop outruns the background writer (queue full): "
                    "spilling raw steps to the spool, summarised later (token strings of "
                    "large batches are not kept)"
                )
        self._append(record, caller=True)

    # processor ------------------------------------------------------------------------------

    def _process_loop(self) -> None:
        while True:
            item, size = self._queue.get()
            with self._cond:
                self._queued_bytes -= size
                budget = sample_budget(self.cfg, self._queue.qsize(), self._queued_bytes)
                self._room.notify()
            if item is None:
                return
            try:
                self._handle(item, budget)
            except Exception as exc:  # pragma: no cover - a bug; the step must not vanish
                log.exception("klmon: could not process a step record")
                if isinstance(item, StepItem):
                    item.rejected = f"could not be processed: {type(exc).__name__}: {exc}"
                    item.texts = item.tokens = item.metrics = None
                    with contextlib.suppress(Exception):
                        self._append(summarize_item(item, self.header, self.cfg))
                        continue
                with self._cond:
                    self._acked += 1
                    self._cond.notify_all()

    def _handle(self, item: StepItem | ControlItem, budget: tuple[int, int]) -> None:
        if isinstance(item, ControlItem):
            record = item.record
        else:
            full = (self.cfg.samples_top, self.cfg.samples_random)
            cfg = (
                self.cfg
                if budget == full
                else replace(self.cfg, samples_top=budget[0], samples_random=budget[1])
            )
            record = summarize_item(item, self.header, cfg)
            if record["status"] == "rejected" and item.policy_logprobs is not None:
                log.warning("klmon: step %d rejected: %s", item.step, record.get("reason"))
            elif budget != full:
                self._count_shed(item, record)
        self._append(record)

    def _count_shed(self, item: StepItem, record: dict[str, Any]) -> None:
        """Count the samples a thinned step did not keep (warned once)."""
        mask, lp = item.mask, item.policy_logprobs
        n = int(mask.any(axis=1).sum()) if mask is not None else int(getattr(lp, "shape", (0,))[0])
        top = min(self.cfg.samples_top, n)
        shed = top + min(self.cfg.samples_random, n - top) - len(record.get("samples") or ())
        if shed <= 0:
            return
        self.stats.add("thinned")
        self.stats.add("samples_shed", shed)
        if not self._warned_thin:
            self._warned_thin = True
            log.warning(
                "klmon: the training loop outruns the background writer: steps keep fewer "
                "drill-down samples while it catches up (run.stats['thinned'], "
                "run.stats['samples_shed']); if the queue fills, whole steps are spilled"
            )

    def _append(self, record: dict[str, Any], *, caller: bool = False) -> None:
        try:
            # On the caller's thread (a spill) never wait for an fsync, nor for the GIL.
            where = self.spool.append(record, may_fsync=not caller, hold_gil=caller)
        except RecordTooLarge as exc:
            smaller = smaller_record(record, str(exc), self.header, self.cfg)
            if smaller is not None:
                self._append(smaller, caller=caller)
                return
            log.error("klmon: a %s record is too large for the spool: %s", record["type"], exc)
            with self._cond:
                self._acked += 1
                self._cond.notify_all()
            return
        except OSError as exc:
            self._spool_failed(record, exc)
            return
        self.remember(where, record)
        self.stats.add("acknowledged")
        is_step = record.get("type") in ("step", "raw")
        if record.get("status") == "rejected":
            self.stats.add("rejected")
        if is_step and self._in_outage:
            self.stats.add("spooled")
        with self._cond:
            self._acked += 1
            self._acked_steps += is_step
            self._cond.notify_all()

    def _spool_failed(self, record: dict[str, Any], exc: OSError) -> None:
        """The spool cannot take a record (disk full, read-only, closed): hold it in memory
        for a direct database write, within ``queue_bytes``; past that (the database is down
        or slower than the loop) it is dropped and counted. Warned once with the reason;
        drops once more with their count."""
        is_step = record.get("type") in ("step", "raw")
        with self._cond:  # the caller's thread (a spill) and the processor both come here
            first, self._spool_error = self._spool_error is None, str(exc)
        if first:
            log.warning(
                "klmon: cannot write the spool %s (%s): steps go straight to the database "
                "while it is up (no crash protection meanwhile); steps it cannot take are "
                "dropped and counted in run.stats['dropped'] (this warning is shown once)",
                self.spool.directory,
                exc,
            )
        if record.get("type") == "raw":
            record = summarize_item(item_from_raw(record), self.header, self.cfg)
        size = record_bytes(record)
        with self._cond:
            keep = not self._direct or self._direct_bytes + size <= self.cfg.queue_bytes
            if keep:
                self._direct.append((record, size))
                self._direct_bytes += size
            self._acked += 1
            self._acked_steps += is_step and keep
            self._cond.notify_all()
        if not keep and is_step:
            self._drop(1)

    # flushing and stopping --------------------------------------------------------------------

    def pending(self) -> tuple[int, bool]:
        """(records not yet acknowledged, whether acknowledged records await the database)."""
        with self._cond:
            return self._submitted - self._acked, self._has_uncommitted()

    def wait(self, timeout: float, *, committed: bool = True) -> bool:
        """Wait until everything submitted is acknowledged (and, with ``committed``, written
        to the database). False if the timeout came first, or (``committed``) if a step was
        ever dropped or refused by the database: True means every logged step is stored."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                done = self._acked >= self._submitted and (
                    not committed or not self._has_uncommitted()
                )
                if done:
                    return not committed or self._lossless()
                if committed:
                    self._hurry.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))

    def _lossless(self) -> bool:
        snap = self.stats.snapshot()
        return snap["dropped"] == 0 and snap["dead_letter"] == 0

    def _spool_written(self) -> bool:
        with self._cond:
            return self._acked >= self._submitted and not self._has_uncommitted()

    def committed_everything(self) -> bool:
        """Every logged step is in the database (none dropped or refused)."""
        return self._spool_written() and self._lossless()

    def stop(self, timeout: float) -> bool:
        """Drain (at most ``timeout`` seconds), stop both threads, close the spool: deleted if
        everything reached the database, else kept for replay. True if all was written."""
        deadline = time.monotonic() + max(timeout, 0.0)
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._queue.put((None, 0))
        self._processor.join(max(deadline - time.monotonic(), 0.01))
        self.wait(max(deadline - time.monotonic(), 0.0))
        done = self._spool_written() and not self._processor.is_alive()
        self._abandon.set()
        self._hurry.set()
        with self._cond:
            self._cond.notify_all()
        self._committer.join(0.5 if done else 0.05)
        with self._cond:  # held in memory only (the spool failed): lost now
            lost = sum(1 for r, _ in self._direct if r.get("type") in ("step", "raw"))
            self._direct.clear()
            self._direct_bytes = 0
        if lost:
            self._drop(lost)
        with contextlib.suppress(OSError):
            self.spool.close(delete=done)
        self.db.dispose()
        return done and self._lossless()


__all__ = [
    "SHED_RANDOM_AT",
    "SHED_SAMPLES_AT",
    "STATS_KEYS",
    "STEP_VALUES_MAX",
    "ApplyResult",
    "BackgroundWriter",
    "ControlItem",
    "Stats",
    "StepItem",
    "WriterConfig",
    "apply_isolated",
    "apply_records",
    "ensure_run",
    "item_from_raw",
    "raw_record",
    "sample_budget",
    "scalar_step_record",
    "summarize_item",
    "to_step_record",
]
