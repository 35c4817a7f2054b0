"""The live client: ``monitor.init(...)`` returns a :class:`Run`; ``run.log_step(...)`` once per
training step.

``log_step`` validates cheaply (shapes, dtypes, non-finite or positive log-probs, empty
responses), copies the arrays and hands them to a background writer; it returns in a fraction
of a millisecond and never raises because of the database. Everything after the copy (the
summary, the samples, the inserts) happens on the writer's threads; see
``monitor.ingest.writer`` for the threads and ``monitor.ingest.spool`` for the spool.

Durability: a step is *acknowledged* once the background thread has appended its record to
the spool, normally within a few milliseconds of ``log_step`` returning (``run.flush()`` waits
for it). An acknowledged step survives a crash of the process (even ``kill -9``; ``klmon sync``
replays it), and an fsync at most ``fsync_interval`` seconds later makes it survive a power
loss. A step logged but not yet acknowledged when the process is killed (the steps still in
the in-memory queue: at most ``queue_size`` steps or ``queue_bytes`` of arrays, typically 0
or 1 step) is lost. When that queue is full, ``log_step`` *spills*: it appends the raw step
to the spool itself (acknowledged on return; summarised later by the writer or ``klmon
sync``), so memory stays bounded and the training loop never waits for the summary.

Example::

    import monitor

    with monitor.init(project="rlhf-llama", name="ppo-beta0.05", config={"kl_coef": 0.05}) as run:
        for step, batch in enumerate(loader):
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref_lp, mask=resp_mask,
                         rewards=scores, kl_coef=beta, texts=(prompts, responses),
                         tokens=token_strs, metrics={"loss/policy": pl, "lr": lr})
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from monitor.config import db_url
from monitor.divergence.ledger import LEDGER_K, LEDGER_K_MAX
from monitor.errors import ConfigError, InvalidInput
from monitor.ingest.accumulate import OpenStep
from monitor.ingest.records import TOKEN_IDS_REJECTED_METRIC
from monitor.ingest.spool import ENV_SPOOL_DIR, SpoolWriter, spool_dir
from monitor.ingest.step_input import (
    EMPTY_RESPONSES_METRIC,
    StepArgs,
    build_item,
    checked_metrics,
)
from monitor.ingest.text import (
    PROJECT_MAX,
    RUN_NAME_MAX,
    check_name,
    clean_json,
)
from monitor.ingest.vocab import Vocabulary
from monitor.ingest.writer import (
    BackgroundWriter,
    ControlItem,
    Stats,
    StepItem,
    WriterConfig,
    scalar_step_record,
)
from monitor.store.database import Database
from monitor.store.sample_retention import SampleRetention
from monitor.store.tables import STEP_MAX, STEP_QUANTITIES

__all__ = ["Run", "init"]

log = logging.getLogger("klmon.ingest")


ENV_EXIT_TIMEOUT = "KLMON_EXIT_TIMEOUT"


def init(
    project: str,
    name: str,
    *,
    config: Mapping[str, Any] | None = None,
    tags: Sequence[Any] | None = None,
    db: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    spool_dir: str | os.PathLike[str] | None = None,
    on_invalid: Literal["raise", "log"] = "raise",
    validate: Literal["full", "shapes"] = "full",
    samples_top: int = 3,
    samples_random: int = 2,
    sample_retention: SampleRetention | str | bool | None = None,
    queue_size: int = 64,
    queue_bytes: int = 64 * 1024 * 1024,
    flush_interval: float = 1.0,
    fsync_interval: float | None = 1.0,
    exit_timeout: float | None = None,
    tokenizer: Any = None,
    ledger_k: int = LEDGER_K,
) -> Run:
    """Start (or resume) logging the run ``project``/``name``.

    ``db``: database URL (default ``$KLMON_DB_URL``, else ``sqlite:///klmon.db``); it need not
    be reachable: until it is, steps wait in the spool (``spool_dir``, default
    ``$KLMON_SPOOL_DIR`` or ``~/.cache/klmon/spool``). Data-parallel ranks each call ``init``
    with the same run name, their ``rank`` and the ``world_size``, and log their own shard of
    every step; the stored step merges all ranks. ``on_invalid``: ``"raise"`` (InvalidInput at
    the call) or ``"log"`` (the step is stored as rejected, with the reason, and counted).
    ``validate``: ``"full"`` checks values at the call (NaN/inf/positive log-probs under the
    mask: ~0.3-0.5 ms for (256, 2048)); ``"shapes"`` checks only shapes, dtypes and empty
    responses at the call and leaves the value checks to the background, where a bad step is
    stored as rejected and counted (it can no longer raise).
    ``samples_top``/``samples_random``: sequences kept per step (per rank) for drill-down.
    ``sample_retention``: which older steps keep them as the run grows (every recent step,
    fewer further back, always around alerts and the highest-KL steps): a
    ``monitor.store.SampleRetention``, a spec like ``"recent=100,top=32,around=4"``,
    ``False`` to keep every step's samples, or None for ``$KLMON_SAMPLE_RETENTION`` (default
    ``SampleRetention()``).
    ``queue_size``/``queue_bytes``: how many steps (and bytes of copied arrays) may wait for
    the background thread before ``log_step`` spills raw steps to the spool (memory bound);
    from a quarter of that steps keep fewer samples (README: load shedding).
    ``exit_timeout``: how long interpreter exit waits for the database (default
    ``$KLMON_EXIT_TIMEOUT`` or 5 s); what is left stays in the spool for ``klmon sync``.
    ``tokenizer``: how to turn the ``token_ids`` of ``log_step`` into text (see
    :meth:`Run.set_vocabulary`); ``ledger_k``: how many token ids each step's ledger keeps
    on each side (largest positive and most negative sums of ``log p - log q``).
    """
    return Run(
        project,
        name,
        config=config,
        tags=tags,
        db=db,
        rank=rank,
        world_size=world_size,
        spool_dir=spool_dir,
        on_invalid=on_invalid,
        validate=validate,
        samples_top=samples_top,
        samples_random=samples_random,
        sample_retention=sample_retention,
        queue_size=queue_size,
        queue_bytes=queue_bytes,
        flush_interval=flush_interval,
        fsync_interval=fsync_interval,
        exit_timeout=exit_timeout,
        tokenizer=tokenizer,
        ledger_k=ledger_k,
    )


class Run:
    """A run being logged. Use :func:`init` to create one; a context manager (``finish`` on
    exit, status 'crashed' when the block raised)."""

    def __init__(
        self,
        project: str,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[Any] | None = None,
        db: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        spool_dir: str | os.PathLike[str] | None = None,
        on_invalid: Literal["raise", "log"] = "raise",
        validate: Literal["full", "shapes"] = "full",
        samples_top: int = 3,
        samples_random: int = 2,
        sample_retention: SampleRetention | str | bool | None = None,
        queue_size: int = 64,
        queue_bytes: int = 64 * 1024 * 1024,
        flush_interval: float = 1.0,
        fsync_interval: float | None = 1.0,
        exit_timeout: float | None = None,
        tokenizer: Any = None,
        ledger_k: int = LEDGER_K,
    ) -> None:
        project = check_name(project, "project", PROJECT_MAX)
        name = check_name(name, "name", RUN_NAME_MAX)
        world_size = _int_arg(world_size, "world_size")
        rank = _int_arg(rank, "rank")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidInput(f"rank {rank} is not in [0, world_size={world_size})")
        _check_options(on_invalid, validate, queue_size)
        ledger_k = _int_arg(ledger_k, "ledger_k")
        if not 1 <= ledger_k <= LEDGER_K_MAX:
            raise InvalidInput(f"ledger_k is {ledger_k}: expected 1 to {LEDGER_K_MAX}")
        vocabulary = None if tokenizer is None else Vocabulary(tokenizer)
        self.validate = validate
        self.project = project
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.on_invalid = on_invalid
        self.config = clean_json(dict(config or {}))
        tags = clean_json(list(tags or []))
        _json_arg(self.config, "config")
        _json_arg(tags, "tags")
        if exit_timeout is None:
            exit_timeout = float(os.environ.get(ENV_EXIT_TIMEOUT, "5"))
        self.exit_timeout = exit_timeout
        self.status = "running"
        self._stats = Stats()
        self._last_step: int | None = None
        self._warned_order = False
        self._warned_metrics = False
        self._warned_empty = False
        self._warned_token_ids = False
        self._finished = False
        self._forked = False
        self._finish_lock = threading.Lock()
        self._open: OpenStep | None = None  # the step add_to_step is building

        # The engine is made now (a bad URL is the caller's bug and raises ConfigError here);
        # connecting, the schema check and creating the run happen on the writer's thread.
        self.db_url = db_url(db)
        database = Database.open(self.db_url, check=False)
        self.spool_dir = Path(spool_dir) if spool_dir else _default_dir()
        retention = SampleRetention.coerce(sample_retention)
        header = self._header(tags, samples_top=samples_top, samples_random=samples_random)
        header["ledger_k"] = ledger_k
        header["sample_retention"] = retention.as_dict()
        self._spool = _open_spool(self.spool_dir, header, fsync_interval)
        self._writer = BackgroundWriter(
            header=header,
            db=database,
            spool=self._spool,
            cfg=WriterConfig(
                samples_top=samples_top,
                samples_random=samples_random,
                queue_size=queue_size,
                queue_bytes=queue_bytes,
                flush_interval=flush_interval,
                ledger_k=ledger_k,
                vocabulary=vocabulary,
            ),
            stats=self._stats,
        )
        _LIVE_RUNS.add(self)

    # --- public API ----------------------------------------------------------------------------

    @property
    def id(self) -> int | None:
        """The run's database id, once the background thread has reached the database."""
        return self._writer.run_id

    @property
    def stats(self) -> dict[str, int]:
        """Counters: logged, acknowledged, written, spooled, replayed, duplicates, conflicts,
        rejected, out_of_order, thinned and samples_shed (steps that kept fewer drill-down
        samples, and those samples, because the writer was behind), spilled (raw steps the
        call appended to the spool: the queue was full), db_errors, corrupt, dropped (the
        spool failed and the database did not take them), dead_letter (refused by the
        database, kept in the dead-letter file); plus ``pending`` (logged steps not yet
        acknowledged) and ``unwritten`` (1 while acknowledged records await the database)."""
        snap = self._stats.snapshot()
        pending, unwritten = self._writer.pending()
        snap["pending"] = pending
        snap["unwritten"] = int(unwritten)
        return snap

    @property
    def spool_path(self) -> Path | None:
        """The spool file this process is appending to."""
        return self._spool.path

    def log_step(
        self,
        step: int,
        *,
        policy_logprobs: Any,
        ref_logprobs: Any,
        mask: Any = None,
        rewards: Any = None,
        kl_coef: float | None = None,
        texts: tuple[Sequence[Any], Sequence[Any]] | None = None,
        tokens: Sequence[Sequence[Any]] | None = None,
        metrics: Mapping[str, Any] | None = None,
        rollout_logprobs: Any = None,
        entropies: Any = None,
        token_ids: Any = None,
    ) -> None:
        """Log one training step (this rank's shard of it in a multi-rank run).

        ``policy_logprobs``/``ref_logprobs``: (B, T) per-token log-probs of the sampled
        tokens under the policy and the frozen reference (numpy arrays, torch tensors or
        nested lists), or lists of 1-D sequences of different lengths (the other per-token
        arguments are then such lists too); ``mask``: (B, T) response mask (default: every
        position); ``rewards``:
        (B,); ``kl_coef``: the penalty coefficient in use; ``texts``: ``(prompts,
        responses)``, B strings each; ``tokens``: B sequences of token strings (aligned with
        the T columns or just the response tokens); ``metrics``: extra scalars by name;
        ``rollout_logprobs``: (B, T) log-probs from the inference engine; ``entropies``: (B, T)
        per-token entropy when the logits give it; ``token_ids``: (B, T) integer ids of the
        sampled tokens, aligned with the log-probs (a list of sequences when those are): the
        step then stores its token ledger (the ``ledger_k`` ids carrying the most positive
        and most negative ``log p - log q``) and ``vocab_top_share``. Unusable ids (wrong
        shape, negative under the mask, not integers) never cost the step: it is stored
        without its ledger, the reason logged and the metric ``klmon/rejected_token_ids`` set
        to 1.

        Raises InvalidInput on unusable input (or, with ``on_invalid='log'``, stores the step as
        rejected). Never raises because of the database; returns in well under a millisecond
        for a (256, 2048) batch (the arrays are copied; texts and tokens are kept by
        reference until the background thread has used them, so do not mutate them in place).
        """
        if self._finished:
            where = " in the parent process (call monitor.init here)" if self._forked else ""
            raise InvalidInput(
                f"run {self.project}/{self.name} is finished{where}: log_step after finish"
            )
        wall = time.time()
        step = _step_arg(step)
        if self._open is not None:
            self.close_step()
        args = StepArgs(
            policy_logprobs,
            ref_logprobs,
            mask,
            rewards,
            kl_coef,
            texts,
            tokens,
            metrics,
            rollout_logprobs,
            entropies,
            token_ids,
        )
        try:
            item = self._build(step, wall, args, allow_all_empty=False)
        except InvalidInput as exc:
            if self.on_invalid == "raise":
                raise
            item = StepItem(step, wall, None, None, None, rejected=str(exc))
            if metrics:
                item.metrics = checked_metrics(metrics, lenient=True)
            log.warning("klmon: step %d rejected: %s", step, exc)
        self._warn_once(item, has_metrics=bool(metrics))
        self._note_order(step)
        self._stats.add("logged")
        self._writer.submit(item)

    def add_to_step(
        self,
        step: int,
        *,
        policy_logprobs: Any,
        ref_logprobs: Any,
        mask: Any = None,
        rewards: Any = None,
        kl_coef: float | None = None,
        texts: tuple[Sequence[Any], Sequence[Any]] | None = None,
        tokens: Sequence[Sequence[Any]] | None = None,
        metrics: Mapping[str, Any] | None = None,
        rollout_logprobs: Any = None,
        entropies: Any = None,
        token_ids: Any = None,
    ) -> None:
        """Add rows to ``step`` when its tokens arrive in several calls (micro-batches of
        different widths, gradient-accumulation passes). Same arguments as :meth:`log_step`.

        The step is closed by :meth:`close_step`, by a call for a later step (``add_to_step``
        or ``log_step``), or by ``flush``/``finish``; it is then summarised exactly as if one
        ``log_step`` call had carried all its rows. Each part is checked and copied here: a
        bad part raises (or, with ``on_invalid='log'``, is left out of the step and counted
        in the metric ``klmon/rejected_parts``). A part whose responses are all empty is
        fine; a step whose responses are all empty is stored as rejected. Metrics of the
        parts are merged by name, a later part's value replacing an earlier one's.
        """
        if self._finished:
            raise InvalidInput(f"run {self.project}/{self.name} is finished: add_to_step")
        step = _step_arg(step)
        if self._open is not None and self._open.step != step:
            self.close_step()
        if self._open is None:
            self._open = OpenStep(step)
        args = StepArgs(
            policy_logprobs,
            ref_logprobs,
            mask,
            rewards,
            kl_coef,
            texts,
            tokens,
            metrics,
            rollout_logprobs,
            entropies,
            token_ids,
        )
        try:
            self._open.add(self._build(step, time.time(), args, allow_all_empty=True))
        except InvalidInput as exc:
            if self.on_invalid == "raise":
                raise
            self._open.refused.append(str(exc))
            log.warning("klmon: a part of step %d left out: %s", step, exc)

    def close_step(self) -> None:
        """Summarise and submit the step :meth:`add_to_step` is building (no-op if none)."""
        open_step, self._open = self._open, None
        if open_step is None:
            return
        item = open_step.merged()
        if item.rejected is not None and item.policy_logprobs is None:
            item.wall_time = time.time()  # no part was usable (the writer logs the others)
            log.warning("klmon: step %d rejected: %s", item.step, item.rejected)
        self._note_order(item.step)
        self._stats.add("logged")
        self._writer.submit(item)

    def log_quantities(
        self,
        step: int,
        quantities: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """A step whose klmon columns come from a trainer's own scalars (TRL's logged ``kl``
        as ``k3``, ``reward`` as ``reward_mean``...), for a run that has no per-token
        log-probs: it then has a current KL, charts and alerts. Unknown column names raise
        InvalidInput; non-finite values are stored as missing. Rank 0 only (others: no-op).
        """
        if self._finished:
            raise InvalidInput("log_quantities after finish")
        step = _step_arg(step)
        unknown = sorted(set(quantities) - set(STEP_QUANTITIES))
        if unknown:
            raise InvalidInput(f"log_quantities: {unknown} are not klmon step quantities")
        checked = checked_metrics(metrics) if metrics else {}
        if self.rank != 0:
            return
        self._note_order(step)
        self._stats.add("logged")
        self._writer.submit(scalar_step_record(step, time.time(), quantities, checked))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Extra named scalars at a step, without log-probs (e.g. a trainer's eval metrics)."""
        if self._finished:
            raise InvalidInput("log_metrics after finish")
        step = _step_arg(step)
        checked = checked_metrics(metrics)
        if self.rank != 0:
            return
        self._stats.add("logged")
        self._writer.submit(
            ControlItem(
                {
                    "type": "metrics",
                    "step": step,
                    "t": time.time(),
                    "metrics": [[n, v] for n, v in checked.items()],
                }
            )
        )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every logged step is in the database (True), or ``timeout`` seconds
        (False; what is not written is safe in the spool and will follow). Also False once a
        step was dropped or dead-lettered (``stats['dropped']``, ``stats['dead_letter']``).
        A step being built with :meth:`add_to_step` is closed first."""
        if self._open is not None and not self._finished:
            self.close_step()
        return self._writer.wait(timeout)

    def finish(self, status: str = "finished", timeout: float | None = None) -> bool:
        """Record the final status, drain to the database for at most ``timeout`` seconds
        (default ``exit_timeout``) and stop the writer. Returns True when everything reached
        the database; otherwise the rest stays in the spool for ``klmon sync``. Idempotent."""
        if status not in ("finished", "crashed"):
            raise InvalidInput(f"status must be 'finished' or 'crashed', not {status!r}")
        with self._finish_lock:
            if self._forked:
                return False
            if self._finished:
                return self._writer.committed_everything()
            if self._open is not None:
                self.close_step()
            self._finished = True
        self.status = status
        # Rank 0 speaks for the run; any rank may report that it crashed.
        if self.rank == 0 or status == "crashed":
            self._writer.submit(ControlItem({"type": "status", "status": status, "t": time.time()}))
        done = self._writer.stop(self.exit_timeout if timeout is None else timeout)
        _LIVE_RUNS.discard(self)
        if not done:
            snap = self._stats.snapshot()
            log.warning(
                "klmon: run %s/%s: not everything reached the database %s; what was spooled "
                "is kept in %s (run `klmon sync` to replay it); dropped: %d, dead letters: %d",
                self.project,
                self.name,
                self._writer.db.safe_url,
                self.spool_dir,
                snap["dropped"],
                snap["dead_letter"],
            )
        return done

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish("crashed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"Run({self.project!r}, {self.name!r}, rank={self.rank}, status={self.status!r})"

    # --- internals -----------------------------------------------------------------------------

    def _header(self, tags: list[Any], *, samples_top: int, samples_random: int) -> dict[str, Any]:
        """What the spool's first line and the runs row say about this process's run."""
        return {
            "project": self.project,
            "name": self.name,
            "config": self.config,
            "tags": list(tags or []),
            "rank": self.rank,
            "world_size": self.world_size,
            "source": "live",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "quantities": list(STEP_QUANTITIES),
            "samples_top": samples_top,
            "samples_random": samples_random,
        }

    @property
    def has_vocabulary(self) -> bool:
        """Whether the run knows how to turn token ids into text (``tokenizer=`` or
        :meth:`set_vocabulary`)."""
        return self._writer.cfg.vocabulary is not None

    def set_vocabulary(self, vocabulary: Any) -> None:
        """How to turn token ids into text, once per run: a list (index = id), a dict
        id -> string, or an object with ``convert_ids_to_tokens`` or ``decode`` (a Hugging
        Face tokenizer). Only the texts of ids that reach a stored ledger are stored."""
        self._writer.cfg.vocabulary = Vocabulary(vocabulary)

    def _warn_once(self, item: StepItem, *, has_metrics: bool) -> None:
        """The warnings a step may call for, each shown once per run."""
        if item.token_ids_problem is not None and not self._warned_token_ids:
            self._warned_token_ids = True
            log.warning(
                "klmon: step %d is stored without its token ledger: %s (counted in the metric "
                "%s; this warning is shown once)",
                item.step,
                item.token_ids_problem,
                TOKEN_IDS_REJECTED_METRIC,
            )
        n_empty = (item.metrics or {}).get(EMPTY_RESPONSES_METRIC)
        if n_empty and not self._warned_empty:
            self._warned_empty = True
            log.warning(
                "klmon: step %d has %d sequences with an empty response; they are left out of "
                "the step's statistics and counted in the metric %s (this warning is shown once)",
                item.step,
                n_empty,
                EMPTY_RESPONSES_METRIC,
            )
        if has_metrics and self.rank != 0 and not self._warned_metrics:
            self._warned_metrics = True
            log.warning(
                "klmon: extra metrics are stored from rank 0 only; rank %d's are ignored",
                self.rank,
            )

    def _build(self, step: int, wall: float, args: StepArgs, *, allow_all_empty: bool) -> StepItem:
        """The checked copy of one call's arguments, as this run validates them."""
        return build_item(
            step,
            wall,
            args,
            check_values=self.validate == "full",
            allow_all_empty=allow_all_empty,
        )

    def _note_order(self, step: int) -> None:
        last = self._last_step
        if last is not None and step < last:
            self._stats.add("out_of_order")
            if not self._warned_order:
                self._warned_order = True
                log.warning(
                    "klmon: step %d logged after step %d (out of order): accepted, counted in "
                    "run.stats['out_of_order']",
                    step,
                    last,
                )
        if last is None or step > last:
            self._last_step = step


def _default_dir() -> Path:
    return spool_dir(None)


def _check_options(on_invalid: str, validate: str, queue_size: int) -> None:
    if on_invalid not in ("raise", "log"):
        raise InvalidInput(f"on_invalid must be 'raise' or 'log', not {on_invalid!r}")
    if validate not in ("full", "shapes"):
        raise InvalidInput(f"validate must be 'full' or 'shapes', not {validate!r}")
    if queue_size < 1:
        raise InvalidInput("queue_size must be >= 1")


def _open_spool(
    directory: Path, header: dict[str, Any], fsync_interval: float | None
) -> SpoolWriter:
    try:
        return SpoolWriter(directory, header, fsync_interval=fsync_interval)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the klmon spool in {directory}: {exc} "
            f"(set {ENV_SPOOL_DIR} or spool_dir= to a writable directory)"
        ) from exc


# --- arguments of the run itself (a step's arrays: monitor.ingest.step_input) ------------------


def _step_arg(value: Any) -> int:
    """A step number the database can hold: 0 <= step <= 2**63 - 1 (BIGINT)."""
    step = _int_arg(value, "step")
    if not 0 <= step <= STEP_MAX:
        raise InvalidInput(f"step must be in [0, 2**63 - 1], got {step}")
    return step


def _json_arg(value: Any, name: str) -> None:
    """Refuse what the JSON columns cannot store (PostgreSQL rejects NaN in JSON)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} must be JSON without NaN/inf: {exc}") from None


def _int_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            return _int_arg(value.item(), name)
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    return int(value)


# --- interpreter exit --------------------------------------------------------------------------

_LIVE_RUNS: set[Run] = set()


def _finish_live_runs() -> None:
    """At interpreter exit: finish every run still open ('crashed' if an exception is ending
    the program), each waiting at most its exit_timeout; what is left stays in the spool."""
    crashed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None)
    for run in list(_LIVE_RUNS):
        try:
            run.finish("crashed" if crashed else "finished")
        except Exception:  # pragma: no cover - exit must go on
            log.exception("klmon: could not finish run %s/%s at exit", run.project, run.name)


def _forget_runs_in_child() -> None:
    """A forked child (a DataLoader worker, say) inherits the Run objects but not their
    threads, and must never finish them: that would mark the run and delete the parent's
    spool files. The child forgets them; logging from it raises."""
    for run in list(_LIVE_RUNS):
        run._finished = True
        run._forked = True
    _LIVE_RUNS.clear()


atexit.register(_finish_live_runs)
os.register_at_fork(after_in_child=_forget_runs_in_child)
