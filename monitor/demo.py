"""The demo database: a handful of simulated runs that show what klmon is for.

``klmon demo`` builds it (``build_demo``), runs the alert engine over it, serves the
dashboard and keeps one run training live (``LiveRun``: a step a second through the live
client, and an alert pass every couple of seconds, so alerts fire while you watch).

The runs (project ``klmon-demo``), each from ``monitor.simulate`` with per-token log-probs
and token ids (the simulator's words are the vocabulary), so they have step summaries, token
histograms, samples with coloured tokens and a token ledger (the drift vocabulary):

- ``ppo-healthy``: KL rises to a plateau under its budget, reward climbs;
- ``ppo-reward-hacking``: reward keeps rising while reward per sqrt(KL) collapses, and the
  policy's drift goes into repeating 'help' and '!!';
- ``ppo-ref-mismatch``: the trainer scores at another temperature than the sampler, so the
  per-token log-ratio turns negative (negative KL: a log-prob mismatch, not a better policy);
- ``ppo-kl-spike``: one batch sends KL to twice its plateau;
- ``ppo-live``: still running; a minute into the demo its KL shifts up past its budget.

Building is idempotent: the demo project's runs are deleted first (and a database file that
holds nothing but the demo is recreated), so running the demo again never duplicates.

Example::

    from monitor.demo import build_demo
    summary = build_demo("sqlite:///klmon-demo.db")
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.store import (
    Database,
    add_annotation,
    count_runs_outside,
    delete_project_runs,
    get_or_create_run,
    set_baseline_run,
    set_run_status,
    sqlite_file,
    touch_run,
    upgrade,
    write_step_records,
)

__all__ = [
    "DEFAULT_DB_FILE",
    "DEMO_PROJECT",
    "DEMO_RUNS",
    "DashboardServer",
    "DemoRun",
    "DemoSummary",
    "LiveRun",
    "build_demo",
    "default_db_url",
    "demo_mail_file",
    "demo_runs",
    "reset_demo",
]

log = logging.getLogger("monitor.demo")

DEMO_PROJECT = "klmon-demo"
DEFAULT_DB_FILE = "klmon-demo.db"
#: Steps written per transaction while building.
CHUNK = 100
#: Seconds between two simulated steps of the finished runs (and of the live run).
FINISHED_STEP_SECONDS = 30.0
LIVE_STEP_SECONDS = 1.0

PROMPTS = (
    "Write a short, friendly greeting for a customer.",
    "Summarise the refund policy in two sentences.",
    "Explain what a KL penalty does in RLHF.",
    "Reply to: 'my order arrived damaged'.",
    "Give one tip for writing clear documentation.",
    "Say thank you to a colleague for their help.",
    "Answer briefly: is it safe to mix bleach and ammonia?",
    "Suggest a name for a small coffee shop.",
)


@dataclass(frozen=True)
class DemoRun:
    """One demo run: its name, the simulated scenario and what it shows."""

    name: str
    scenario: str
    steps: int
    onset: int | None
    status: str
    story: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    #: Steps after the onset at which ``note`` is attached (a post-mortem annotation).
    note_after: int = 0


def demo_runs(steps: int = 400) -> tuple[DemoRun, ...]:
    """The demo runs, ``steps`` steps of history each (the live run gets half)."""
    steps = max(int(steps), 60)
    from monitor.simulate import LEN_MEAN, MAX_LEN, PLATEAU_TOKEN_KL, TARGET_MARGIN

    base = {
        "model": "demo-policy-1b",
        "reference": "demo-sft-1b (frozen)",
        "learning_rate": 1e-6,
        "batch_size": 16,
        "temperature": 1.0,
        "kl_coef": 0.05,
        # the simulator's healthy plateau is ~14 nats per sequence (kl_mean)
        "target_kl": float(f"{TARGET_MARGIN * PLATEAU_TOKEN_KL['sequence'] * LEN_MEAN:.2g}"),
        "kl_budget": 24.0,
        "max_response_length": MAX_LEN,
    }
    live = max(steps // 2, 30)
    return (
        DemoRun(
            "ppo-healthy",
            "healthy",
            steps,
            None,
            "finished",
            "healthy PPO: KL rises to a plateau under its budget, reward climbs",
            seed=11,
            config=base,
        ),
        DemoRun(
            "ppo-reward-hacking",
            "reward_hacking",
            steps,
            int(steps * 0.5),
            "finished",
            "reward keeps rising while reward per sqrt(KL) collapses; the policy repeats help, !!",
            seed=12,
            config={**base, "reward_model": "rm-v2-unregularised"},
            note="RM v2 rewards polite boilerplate; reward up, quality down (see samples)",
            note_after=40,
        ),
        DemoRun(
            "ppo-ref-mismatch",
            "negative_kl",
            steps,
            int(steps * 0.6),
            "finished",
            "sampler and trainer disagree on temperature: KL turns negative",
            seed=13,
            config={**base, "sampler_temperature": 0.7},
            note="vLLM sampler redeployed at temperature 0.7; trainer still scores at 1.0",
        ),
        DemoRun(
            "ppo-kl-spike",
            "spike",
            steps,
            int(steps * 0.75),
            "finished",
            "one bad batch sends KL to twice its plateau",
            seed=14,
            config={**base, "learning_rate": 3e-6},
            note="data loader restarted mid-epoch: a batch of near-duplicate prompts",
        ),
        DemoRun(
            "ppo-live",
            "shift",
            live,
            # A minute of live steps after the history, KL shifts up past its budget.
            live + 60,
            "running",
            "still training (a step a second); a minute in, KL shifts up past its budget",
            seed=15,
            config={**base, "learning_rate": 2e-6},
        ),
    )


DEMO_RUNS = demo_runs()


@dataclass
class DemoSummary:
    """What ``build_demo`` made."""

    db_url: str
    run_ids: dict[str, int]
    steps: int
    samples: int
    seconds: float
    live_next_step: int | None = None


def demo_mail_file(url: str) -> str:
    """Where demo alert emails go when no SMTP server is configured: an mbox next to the
    SQLite file (``klmon-demo.mbox``), else in the working directory."""
    path = sqlite_file(url)
    if path is None:
        return "klmon-demo.mbox"
    return str(path.with_suffix(".mbox"))


def reset_demo(url: str) -> None:
    """Remove a previous demo: the demo project's runs (and all that hangs off them). A
    SQLite file that holds nothing but demo runs is deleted and made anew, so it does not
    keep the old file's size. Other projects in the database are never touched."""
    path = sqlite_file(url)
    if path is not None and path.exists():
        db = Database.open(url, check=False)
        try:
            others = count_runs_outside(db, DEMO_PROJECT)
        finally:
            db.dispose()
        if not others:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
    db = Database.open(url, check=False)
    try:
        with db.translate_errors():
            upgrade(db.engine)
        delete_project_runs(db, DEMO_PROJECT)
    finally:
        db.dispose()


def _texts(step: int, n: int) -> list[str]:
    return [PROMPTS[(step * n + i) % len(PROMPTS)] for i in range(n)]


def _item(batch: Any, wall: float) -> Any:
    from monitor.ingest.writer import StepItem

    return StepItem(
        step=batch.step,
        wall_time=wall,
        **_logged(batch),
        extra={"rollout_logprobs": _rollout(batch), "entropies": batch.entropies},
    )


def _logged(batch: Any) -> dict[str, Any]:
    """What the demo logs of a simulated batch, besides the rollout log-probs and entropies
    (the fields ``log_step`` and a writer StepItem share)."""
    return {
        "policy_logprobs": batch.policy_logprobs,
        "ref_logprobs": batch.ref_logprobs,
        "mask": batch.mask,
        "rewards": batch.rewards,
        "kl_coef": batch.kl_coef,
        "texts": (_texts(batch.step, len(batch.rewards)), batch.texts),
        "tokens": batch.tokens,
        "token_ids": batch.token_ids,
        "metrics": {**batch.extras, "loss/policy": float(-batch.rewards.mean() * 0.05)},
    }


def _rollout(batch: Any) -> Any:
    """The simulator adds noise to the rollout engine's log-probs, which can push a token
    that is almost certain just above 0; a real engine never reports that."""
    import numpy as np

    return np.minimum(batch.rollout_logprobs, 0.0)


def _batches(spec: DemoRun, extra_steps: int = 0) -> Iterator[Any]:
    from monitor.simulate import iter_batches

    return iter_batches(
        spec.scenario, steps=spec.steps + extra_steps, seed=spec.seed, onset=spec.onset
    )


def build_demo(
    url: str,
    *,
    steps: int = 400,
    now: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> DemoSummary:
    """Create (or recreate) the demo runs in the database at ``url``; ``progress(n)`` is
    called as steps are written. Returns what was made."""
    from monitor.ingest.vocab import Vocabulary
    from monitor.ingest.writer import WriterConfig, summarize_item, to_step_record
    from monitor.simulate import VOCAB

    started = time.perf_counter()
    now = time.time() if now is None else now
    reset_demo(url)
    db = Database.open(url, check=False)
    try:
        with db.translate_errors():
            upgrade(db.engine)
        specs = demo_runs(steps)
        run_ids: dict[str, int] = {}
        n_steps = n_samples = 0
        finished = [s for s in specs if s.status != "running"]
        live_next = None
        for spec in specs:
            if spec.status == "running":
                first = now - spec.steps * LIVE_STEP_SECONDS
                gap = LIVE_STEP_SECONDS
            else:
                # finished runs end one after the other over the last hours
                ends_ago = (len(finished) - finished.index(spec)) * 1800.0
                first = now - ends_ago - spec.steps * FINISHED_STEP_SECONDS
                gap = FINISHED_STEP_SECONDS
            config = {**spec.config, "scenario": spec.scenario, "story": spec.story}
            header = {"project": DEMO_PROJECT, "name": spec.name, "rank": 0, "world_size": 1}
            records = []
            last_wall = first
            # one vocabulary per run: it remembers which ids' texts the run has stored
            cfg = WriterConfig(samples_top=3, samples_random=1, vocabulary=Vocabulary(VOCAB))
            for batch in _batches(spec):
                last_wall = first + batch.step * gap
                rec = summarize_item(_item(batch, last_wall), header, cfg)
                records.append(to_step_record(rec))
                if len(records) >= CHUNK:
                    n_samples += _flush(db, run_ids, spec, config, first, records)
                    n_steps += len(records)
                    if progress:
                        progress(len(records))
                    records = []
            if records:
                n_samples += _flush(db, run_ids, spec, config, first, records)
                n_steps += len(records)
                if progress:
                    progress(len(records))
            run_id = run_ids[spec.name]
            _finish_run(db, run_id, spec, specs, run_ids, last_wall)
            if spec.status == "running":
                live_next = spec.steps
        return DemoSummary(
            db_url=url,
            run_ids=run_ids,
            steps=n_steps,
            samples=n_samples,
            seconds=time.perf_counter() - started,
            live_next_step=live_next,
        )
    finally:
        db.dispose()


def _flush(
    db: Database,
    run_ids: dict[str, int],
    spec: DemoRun,
    config: dict[str, Any],
    first: float,
    records: list[Any],
) -> int:
    if spec.name not in run_ids:
        info = get_or_create_run(
            db,
            DEMO_PROJECT,
            spec.name,
            config=config,
            tags=["demo", spec.scenario],
            source="demo",
            now=first,
        )
        run_ids[spec.name] = info.id
    write_step_records(db, run_ids[spec.name], records)
    return sum(len(r.samples) for r in records)


def _finish_run(
    db: Database,
    run_id: int,
    spec: DemoRun,
    specs: tuple[DemoRun, ...],
    run_ids: dict[str, int],
    last_wall: float,
) -> None:
    healthy = run_ids.get(specs[0].name)
    touch_run(db, run_id, now=last_wall)
    if healthy is not None and healthy != run_id:
        set_baseline_run(db, run_id, healthy)
    if spec.status != "running":
        set_run_status(db, run_id, spec.status, now=last_wall)
    if spec.note and spec.onset is not None:
        add_annotation(
            db, run_id, spec.onset + spec.note_after, spec.note, author="klmon demo (post-mortem)"
        )


class LiveRun:
    """Keeps the demo's running run training: a step every ``interval`` seconds through the
    live client (``monitor.init(...).log_step``), and an alert pass every
    ``alert_interval`` seconds whose firing and resolved alerts go to ``on_alert``.

    ``start()`` returns at once (a daemon thread); ``stop()`` finishes the run."""

    def __init__(
        self,
        url: str,
        *,
        steps: int = 400,
        start_step: int | None = None,
        interval: float = LIVE_STEP_SECONDS,
        engine: Any = None,
        alert_interval: float = 2.0,
        on_alert: Callable[[Any], None] | None = None,
    ) -> None:
        spec = next(s for s in demo_runs(steps) if s.status == "running")
        self.spec = spec
        self.url = url
        self.interval = interval
        self.engine = engine
        self.alert_interval = alert_interval
        self.on_alert = on_alert
        self.next_step = spec.steps if start_step is None else start_step
        self.logged = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run: Any = None
        self._spool = tempfile.mkdtemp(prefix="klmon-demo-spool-")

    def start(self) -> LiveRun:
        import monitor
        from monitor.simulate import VOCAB

        self._run = monitor.init(
            DEMO_PROJECT,
            self.spec.name,
            db=self.url,
            tokenizer=VOCAB,
            spool_dir=self._spool,
            samples_top=3,
            samples_random=1,
            flush_interval=0.2,
        )
        self._thread = threading.Thread(target=self._loop, name="klmon-demo-live", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # The same simulated run, continued past its history; skip what is stored.
        batches = _batches(self.spec, extra_steps=100_000)
        next_alerts = time.monotonic() + self.alert_interval
        tick = time.monotonic()
        for batch in batches:
            if batch.step < self.next_step:
                continue
            if self._stop.is_set():
                return
            try:
                self._run.log_step(
                    batch.step,
                    **_logged(batch),
                    rollout_logprobs=_rollout(batch),
                    entropies=batch.entropies,
                )
                self.logged += 1
                self.next_step = batch.step + 1
            except Exception as exc:  # a demo thread must not die silently
                self.errors.append(str(exc))
                log.warning("klmon demo: live step %d failed: %s", batch.step, exc)
            if self.engine is not None and time.monotonic() >= next_alerts:
                next_alerts = time.monotonic() + self.alert_interval
                self._alerts()
            tick += self.interval
            if self._stop.wait(max(0.0, tick - time.monotonic())):
                return

    def _alerts(self) -> None:
        try:
            self._run.flush(timeout=5.0)
            report = self.engine.run_once()
        except Exception as exc:
            self.errors.append(str(exc))
            log.warning("klmon demo: alert pass failed: %s", exc)
            return
        if self.on_alert is not None and (report.fired or report.resolved):
            self.on_alert(report)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._run is not None:
            self._run.finish("finished", timeout=timeout)
        shutil.rmtree(self._spool, ignore_errors=True)


def default_db_url() -> str:
    """``sqlite:///klmon-demo.db`` in the working directory."""
    return f"sqlite:///{os.path.join('.', DEFAULT_DB_FILE)}"


class DashboardServer:
    """The dashboard on ``host:port`` in a background thread (werkzeug's threaded server:
    enough for one person's demo; production uses gunicorn, see docker/).

    The socket is bound in the constructor, so a busy port fails (or moves, with
    ``fallback``) before anything is printed."""

    def __init__(self, url: str, host: str = "127.0.0.1", port: int = 8050, *, fallback: int = 20):
        from werkzeug.serving import make_server

        from monitor.dashboard import DashboardSettings, create_app

        self.app = create_app(DashboardSettings(db_url=url, host=host, port=port or 8050))
        last_error: OSError | None = None
        for candidate in [*range(port, port + fallback + 1), 0] if port else [0]:
            try:
                self.server = make_server(host, candidate, self.app.server, threaded=True)
                break
            except OSError as exc:
                last_error = exc
        else:  # pragma: no cover - not even an ephemeral port
            raise OSError(f"no free port for the dashboard: {last_error}")
        # one line per request would bury the demo's own output
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.host = host
        self.port = self.server.server_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="klmon-demo-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        if self._thread is not None:
            self._thread.join(5)
        self.server.server_close()
