"""What klmon costs a training loop, measured through the user path: ``Run.log_step`` called
once per simulated training step, next to the floor (copying the step's three arrays) and
MLflow's ``log_batch`` of the same scalars, all in the same run.

1. ``--only overhead`` (the default section). For a (256, 2048) float32 batch (policy and
   reference log-probs, a bool response mask, rewards, texts, token strings, 2 extra metrics;
   5 drill-down samples per step, the defaults), a step every ``--step-ms`` (20 ms; the loop
   sleeps, as a GPU step releases the GIL), on SQLite and PostgreSQL:

   - blocking time of the call: p50 / p99 / max over ``--steps`` calls;
   - background CPU per step: the CPU time of klmon's threads (processor, committer, the
     summary's helper thread), read from ``/proc/self/task/<tid>/schedstat`` before the first
     step and after ``flush()`` (so the database writes of every step are in), divided by
     the steps;
   - each case runs twice: the blocking times, the background CPU and the bytes come from a
     run as a training process has it, the GIL columns from a second run with the GIL probe
     below. The probe's thread wakes every 0.1 ms and preempts klmon's threads some 20
     times a step, so that run's background CPU ("probed") is higher: it is printed too;
   - time the GIL was held per step, as a probe thread sees it: the probe sleeps 0.1 ms in a
     loop and adds up how late it wakes. A thread that wakes must take the GIL, and on a
     loaded machine must also wait for a CPU: the kernel counts the latter for each thread
     (the second field of ``/proc/thread-self/schedstat``), so the lateness less that, less
     the timer slack of an undisturbed wake (calibrated just before), is time the probe
     waited while another thread held the GIL. The sum per step is what the loop's own
     thread (the copies, ``log_step``) and klmon's threads held; the floor row, measured the
     same way, is the loop's share and the method's noise. It undercounts holds shorter
     than the probe's period; "worst" is the latest single wake (CPU waits included);
   - bytes per step in the database (SQLite: pages in use; PostgreSQL: ``pg_database_size``),
     each case on a fresh database;
   - the shedding case (back to back, no sleep: the loop outruns the writer): blocking
     p50 / p99 / max, next to the floor run the same way, and what was shed (``run.stats``:
     ``thinned``, ``samples_shed``, ``spilled``), then every step is checked to be stored;
     the calls over 10 ms, and which of them overlapped a garbage collection of the process
     (full, or young and over 2 ms), which stops every thread, or the machine's steal time
     (on a virtual machine, its CPUs given to another guest: no thread's own CPU wait shows
     it).

   Every timed loop starts after a ``gc.collect()`` of the benchmark's own setup (the
   inputs it builds, 524k token strings in 256 lists): a training process's long-lived
   objects sit in the oldest generation, while freshly built inputs would be walked by the
   loop's first young collections, 8-11 ms each, charged to the call that triggers one.

   MLflow runs the same loop in its own virtual environment (``.venv-mlflow`` at the
   repository root): ``log_batch`` of the 22 step quantities and 2 metrics per step into a
   SQLite tracking store, synchronously, so its blocking time is its cost. Create it with
   ``python3 -m venv .venv-mlflow && .venv-mlflow/bin/pip install "mlflow==3.17.*"``
   (or pass ``--mlflow-python``); without it the MLflow row is skipped with the reason.

2. ``--only dtypes``: blocking p50/p99 of ``log_step`` for a (256, 2048) batch given as numpy
   float32, torch float32 and torch bfloat16 (CPU; torch rows need torch installed), each
   next to its copy floor measured in the same run (copying the same arrays' raw bytes).
3. ``--only watch``: wall time of a tiny TRL GRPO run (tests/support/trl_tiny.py, CPU) with and
   without ``monitor.integrations.trl.watch``, interleaved, same seed: watch's overhead per
   training step (needs the ``trl`` extra).

    .venv/bin/python benchmarks/bench_ingest.py                       # overhead, 500 steps
    .venv/bin/python benchmarks/bench_ingest.py --steps 300 --repeats 3
    .venv-trl/bin/python benchmarks/bench_ingest.py --only dtypes
    .venv-trl/bin/python benchmarks/bench_ingest.py --only watch --watch-steps 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_URL = os.environ.get("KLMON_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MLFLOW_VENV = REPO / ".venv-mlflow"
B, T = 256, 2048


# --- databases --------------------------------------------------------------------------------


def _fresh_sqlite(directory: Path, name: str) -> str:
    from monitor.store.engine import make_engine
    from monitor.store.schema import upgrade

    url = f"sqlite:///{directory / name}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def _fresh_pg(name: str) -> str | None:
    from sqlalchemy import text

    from monitor.store.engine import make_engine
    from monitor.store.schema import upgrade

    try:
        admin = make_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:
        print(f"  (PostgreSQL at {PG_URL} not usable: {str(exc).splitlines()[0]})")
        return None
    url = f"{PG_URL.rpartition('/')[0]}/{name}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def _drop_pg(name: str) -> None:
    from sqlalchemy import text

    from monitor.store.engine import make_engine

    admin = make_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _db_bytes(url: str) -> int:
    """Bytes the database holds: SQLite pages in use (after a checkpoint), or PostgreSQL's
    ``pg_database_size``."""
    from sqlalchemy import text

    from monitor.store.engine import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
                free = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
                size = conn.exec_driver_sql("PRAGMA page_size").scalar()
                return int((pages - free) * size)
            return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar())
    finally:
        engine.dispose()


# --- what the loop feeds ----------------------------------------------------------------------


def _batches(n_distinct: int, b: int = B, t: int = T, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_distinct):
        lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
        ref = np.minimum(lp + rng.normal(0, 0.2, (b, t)).astype(np.float32), 0.0)
        lengths = rng.integers(t // 4, t + 1, size=b)
        mask = np.arange(t)[None, :] < lengths[:, None]
        out.append((lp, ref, mask, rng.normal(size=b)))
    return out


# --- measuring --------------------------------------------------------------------------------


def _thread_cpu(prefix: str = "klmon") -> float | None:
    """CPU seconds of this process's threads whose name starts with ``prefix`` (Linux
    ``schedstat``: nanoseconds on a CPU); None where /proc is not there."""
    total = 0.0
    for th in threading.enumerate():
        if not th.name.startswith(prefix) or th.native_id is None:
            continue
        try:
            ns = Path(f"/proc/self/task/{th.native_id}/schedstat").read_text().split()[0]
        except (OSError, IndexError):
            return None
        total += int(ns) / 1e9
    return total


def _run_delay() -> float:
    """Seconds the calling thread has waited for a CPU while runnable (the second field of
    Linux's ``schedstat``): the machine's load, not the GIL."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def _steal_ticks() -> int:
    """The machine's steal time so far, in clock ticks (1/100 s) over all CPUs: time the
    hypervisor of a virtual machine gave this machine's CPUs to another guest. A thread's own
    wait for a CPU (``_run_delay``) does not show it; 0 where /proc/stat has no such field."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


class GilProbe:
    """A thread that sleeps ``period`` in a loop and adds up how late it wakes (see the module
    doc): the lateness, less the time it waited for a CPU (``_run_delay``) and less the timer
    slack of an undisturbed wake (calibrated first), is time it waited for the GIL."""

    def __init__(self, period: float = 1e-4) -> None:
        self.period = period
        self.slack = self._calibrate()
        self._stop = threading.Event()
        self.waited = 0.0  # for the GIL, seconds in all
        self.cpu_wait = 0.0  # for a CPU (the load of the machine), seconds in all
        self.worst = 0.0  # the latest single wake, less the slack
        self._thread = threading.Thread(target=self._loop, name="bench-gil-probe", daemon=True)

    def _calibrate(self, seconds: float = 0.3) -> float:
        n, late, d0 = 0, 0.0, _run_delay()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            time.sleep(self.period)
            late += time.perf_counter() - t0 - self.period
            n += 1
        return max(0.0, late - (_run_delay() - d0)) / n

    def _loop(self) -> None:
        period, slack = self.period, self.slack
        n, late, d0 = 0, 0.0, _run_delay()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(period)
            lag = time.perf_counter() - t0 - period
            late += lag
            n += 1
            self.worst = max(self.worst, lag - slack)
        self.cpu_wait = _run_delay() - d0
        self.waited = max(0.0, late - self.cpu_wait - n * slack)

    def __enter__(self) -> GilProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class NoProbe:
    """Stands in for :class:`GilProbe` in the runs that time the calls and the background CPU:
    the probe's thread, waking every 0.1 ms, preempts klmon's threads some 20 times a step
    and takes the GIL at each hand-off, which a training loop's process does not have."""

    waited = worst = float("nan")

    def __enter__(self) -> NoProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Collections:
    """The process's garbage collections that took over ``SLOW_COLLECTION`` while in the block:
    (generation, start, end) with perf_counter times. A collection holds the GIL throughout,
    stopping every thread whichever thread's allocation started it: a full one (generation
    2) for a time that grows with all the objects of the process (the training framework's
    too), a young one (0 or 1) with the containers allocated since the last one, and with
    everything they reference."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, float, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif (end := time.perf_counter()) - self._start > SLOW_COLLECTION:
            self.spans.append((info["generation"], self._start, end))

    def __enter__(self) -> Collections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def overlapping(self, starts: np.ndarray, ends: np.ndarray, full: bool) -> np.ndarray:
        """Which calls ([starts, ends) pairs) overlapped a slow full collection (``full``) or
        a slow young one."""
        hit = np.zeros(len(starts), dtype=bool)
        for generation, a, b in self.spans:
            if (generation == 2) == full:
                hit |= (starts < b) & (ends > a)
        return hit

    def pauses_ms(self, full: bool) -> list[float]:
        return [round((b - a) * 1e3, 1) for g, a, b in self.spans if (g == 2) == full]


SLOW_COLLECTION = 0.002
"""Seconds from which :class:`Collections` records a collection."""


def _settle() -> None:
    """Collect the benchmark's own setup (the inputs it just built: 256 lists of 2,048 token
    strings reference 524k objects) into the oldest generation before the timed loop, as a
    training process's long-lived objects are: otherwise the first young collections in the
    loop walk all of them (8-11 ms each, measured) and whichever call triggers one is charged
    for the benchmark's setup."""
    gc.collect()


def _percentiles(wall: np.ndarray, cpu: np.ndarray | None = None) -> dict:
    """Blocking time of the calls (ms), and the calling thread's CPU time when given."""
    out = {}
    for key, a in (("", wall), ("cpu_", cpu)):
        if a is not None:
            ms = np.asarray(a) * 1e3
            out[f"{key}p50_ms"] = float(np.percentile(ms, 50))
            out[f"{key}p99_ms"] = float(np.percentile(ms, 99))
            out[f"{key}max_ms"] = float(ms.max())
    return out


# --- 1. the loop: floor, klmon, MLflow --------------------------------------------------------


def bench_floor(steps: int, step_ms: float, probe: bool = False) -> dict:
    """What any client must at least do: copy the two log-prob arrays and the mask.
    ``probe``: with the GIL probe running (its figures; else NaN)."""
    batches = _batches(4)
    times = np.empty(steps)
    _settle()
    with GilProbe() if probe else NoProbe() as probe:
        for step in range(steps):
            lp, ref, mask = batches[step % len(batches)][:3]
            t0 = time.perf_counter()
            np.array(lp, copy=True)
            np.array(ref, copy=True)
            np.array(mask, copy=True)
            times[step] = time.perf_counter() - t0
            if step_ms > 0:
                time.sleep(step_ms / 1000)
    return {
        "case": "floor: copy 3 arrays",
        **_percentiles(times),
        "bg_cpu_ms": 0.0,
        "gil_ms": probe.waited / steps * 1e3,
        "gil_worst_ms": probe.worst * 1e3,
        "bytes": None,
    }


def bench_klmon(
    url: str, label: str, steps: int, step_ms: float, spool: Path, probe: bool = False
) -> dict:
    """``log_step`` in a loop on a new run; ``probe``: with the GIL probe running (as
    :func:`bench_floor`)."""
    import monitor

    batches = _batches(4)
    prompts = [f"prompt {i}" for i in range(B)]
    responses = [f"response {i}" for i in range(B)]
    tokens = [[f"tok{j}" for j in range(T)] for _ in range(B)]
    before = _db_bytes(url)
    run = monitor.init(
        "bench",
        f"{label}-{time.time_ns()}",
        db=url,
        spool_dir=spool,
        config={"kl_coef": 0.05},
        exit_timeout=30.0,
    )
    run.flush(30.0)  # the run row exists: what follows is the steps
    _settle()
    cpu0 = _thread_cpu()
    times, starts, cpu_waits = np.empty(steps), np.empty(steps), np.empty(steps)
    steals = np.zeros(steps, dtype=np.int64)
    steal0 = _steal_ticks()
    with GilProbe() if probe else NoProbe() as probe, Collections() as collections:
        for step in range(steps):
            lp, ref, mask, rewards = batches[step % len(batches)]
            s0 = _steal_ticks() if step_ms <= 0 else 0  # back to back: which calls saw steal
            d0 = _run_delay()
            t0 = starts[step] = time.perf_counter()
            run.log_step(
                step,
                policy_logprobs=lp,
                ref_logprobs=ref,
                mask=mask,
                rewards=rewards,
                kl_coef=0.05,
                texts=(prompts, responses),
                tokens=tokens,
                metrics={"loss/policy": 0.1, "lr": 1e-6},
            )
            times[step] = time.perf_counter() - t0
            cpu_waits[step] = _run_delay() - d0
            if step_ms <= 0:
                steals[step] = _steal_ticks() - s0
            if step_ms > 0:
                time.sleep(step_ms / 1000)
        flushed = run.flush(600.0)
    steal_ms = (_steal_ticks() - steal0) * 10.0
    cpu1 = _thread_cpu()
    stats = run.stats
    run.finish(timeout=30.0)
    bg = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / steps * 1e3
    ends = starts + times
    in_full = collections.overlapping(starts, ends, full=True)
    in_gc = in_full | collections.overlapping(starts, ends, full=False)
    over = times > 0.010
    return {
        "case": label,
        **_percentiles(times),
        "over_10ms": int(np.sum(over)),
        "over_10ms_in_full_gc": int(np.sum(over & in_full)),
        "over_10ms_in_young_gc": int(np.sum(over & in_gc & ~in_full)),
        "max_outside_gc_ms": float(times[~in_gc].max() * 1e3) if (~in_gc).any() else None,
        # the call's time less what its thread waited for a CPU (the machine's load)
        "max_less_cpu_wait_ms": float((times - cpu_waits).max() * 1e3),
        # calls during which the hypervisor gave the machine's CPUs to another guest
        "over_10ms_with_steal": int(np.sum(over & (steals > 0))),
        "steal_ms": steal_ms,
        "full_gcs_ms": collections.pauses_ms(full=True),
        "young_gcs_ms": collections.pauses_ms(full=False),
        "bg_cpu_ms": bg,
        "gil_ms": probe.waited / steps * 1e3,
        "gil_worst_ms": probe.worst * 1e3,
        "bytes": (_db_bytes(url) - before) / steps,
        "flushed": flushed,
        "stats": stats,
    }


MLFLOW_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, tempfile
    import numpy as np
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    steps, per_step, step_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    d = tempfile.mkdtemp()
    path = f"{d}/mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    exp = client.create_experiment("bench", artifact_location=f"{d}/art")
    run = client.create_run(exp)
    names = [f"q{i}" for i in range(per_step)]
    size0 = os.path.getsize(path)
    times, cpu = [], []
    for s in range(steps):
        ts = int(time.time() * 1000)
        ms = [Metric(n, float(s * 0.001 + i), ts, s) for i, n in enumerate(names)]
        c0, t0 = time.process_time(), time.perf_counter()
        client.log_batch(run.info.run_id, metrics=ms)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        time.sleep(step_ms / 1000)
    import sqlite3
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    used = (con.execute("PRAGMA page_count").fetchone()[0]
            - con.execute("PRAGMA freelist_count").fetchone()[0])
    used *= con.execute("PRAGMA page_size").fetchone()[0]
    import mlflow
    print(json.dumps({"times": times, "cpu": cpu, "bytes": (used - size0) / steps,
                      "version": mlflow.__version__}))
    """
)


def _mlflow_python(explicit: str | None) -> str | None:
    """The interpreter of MLflow's own environment, or None (the reason printed)."""
    if explicit:
        if shutil.which(explicit) is None and not Path(explicit).is_file():
            print(f"  MLflow skipped: --mlflow-python {explicit} is no interpreter")
            return None
        return explicit
    py = MLFLOW_VENV / "bin" / "python"
    if not py.exists():
        print(
            f"  MLflow skipped: {MLFLOW_VENV} does not exist; create it with\n"
            f"    python3 -m venv {MLFLOW_VENV} && {MLFLOW_VENV}/bin/pip install 'mlflow==3.17.*'"
        )
        return None
    if subprocess.run([str(py), "-c", "import mlflow"], capture_output=True).returncode != 0:
        print(f"  MLflow skipped: {py} cannot import mlflow (pip install 'mlflow==3.17.*')")
        return None
    return str(py)


def bench_mlflow(python: str, steps: int, step_ms: float, per_step: int) -> dict | None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MLFLOW_SCRIPT)
    try:
        out = subprocess.run(
            [python, f.name, str(steps), str(per_step), str(step_ms)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        print("  MLflow run failed:", out.stderr.strip().splitlines()[-1:])
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "case": f"MLflow {res['version']} log_batch",
        **_percentiles(np.asarray(res["times"])),
        # synchronous: its work is on the caller's thread (process CPU of the call)
        "bg_cpu_ms": float(np.median(res["cpu"])) * 1e3,
        "gil_ms": None,
        "gil_worst_ms": None,
        "bytes": res["bytes"],
    }


def _probed(measure: Callable[[bool], dict]) -> dict:
    """``measure`` run twice: without the GIL probe (the row's blocking times, background CPU
    and bytes: what a training process has) and with it (the GIL columns, and the background
    CPU with the probe preempting it, ``bg_cpu_probed_ms``)."""
    row = measure(False)
    probed = measure(True)
    row.update(
        gil_ms=probed["gil_ms"],
        gil_worst_ms=probed["gil_worst_ms"],
        bg_cpu_probed_ms=probed["bg_cpu_ms"],
    )
    return row


def _row(r: dict) -> str:
    def num(v, fmt=".2f"):
        return "-" if v is None or v != v else format(v, fmt)

    size = "-" if r.get("bytes") is None else f"{r['bytes'] / 1024:.1f} kB"
    return (
        f"  {r['case']:<26} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['max_ms']:>7.2f}"
        f"  {num(r['bg_cpu_ms']):>8} {num(r.get('bg_cpu_probed_ms')):>8}"
        f"  {num(r['gil_ms']):>7} {num(r['gil_worst_ms']):>6}  {size:>9}"
    )


HEADER = (
    f"  {'case':<26} {'p50':>7} {'p99':>7} {'max':>7}  {'bg cpu':>8} {'(probed)':>8}"
    f"  {'gil':>7} {'worst':>6}  {'db/step':>9}\n"
    f"  {'':<26} {'(ms, blocking the loop)':>23}  {'ms/step':>8} {'ms/step':>8}"
    f"  {'ms/step':>7} {'ms':>6}"
)


def overhead(args: argparse.Namespace, work: Path) -> list[dict]:
    from monitor.store.tables import STEP_QUANTITIES

    rows: list[dict] = []
    targets = [("sqlite", _fresh_sqlite(work, f"o-{i}.db")) for i in range(args.repeats)]
    pg_urls = []
    for i in range(args.repeats):
        pg = _fresh_pg(f"klmon_bench_overhead_{i}")
        if pg:
            pg_urls.append((f"klmon_bench_overhead_{i}", pg))
    print(
        f"log_step, ({B}, {T}) float32, 5 samples/step, a step every {args.step_ms:g} ms, "
        f"{args.steps} steps x {args.repeats} (load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs, shared)"
    )
    print(HEADER)
    mlpy = _mlflow_python(args.mlflow_python)
    steps, step_ms = args.steps, args.step_ms
    for i in range(args.repeats):
        fl = _probed(lambda probe: bench_floor(steps, step_ms, probe))
        rows.append(fl)
        print(_row(fl), flush=True)
        cases = [("klmon SQLite", targets[i][1], f"sp{i}")]
        if i < len(pg_urls):
            cases.append(("klmon PostgreSQL", pg_urls[i][1], f"spp{i}"))
        for label, url, spool in cases:
            r = _probed(
                lambda probe, label=label, url=url, spool=spool: bench_klmon(
                    url, label, steps, step_ms, work / f"{spool}-{probe}", probe
                )
            )
            rows.append(r)
            print(_row(r), flush=True)
        if mlpy:
            m = bench_mlflow(mlpy, args.mlflow_steps, args.step_ms, len(STEP_QUANTITIES) + 2)
            if m:
                rows.append(m)
                print(_row(m), flush=True)
    _medians(rows)
    url = _fresh_sqlite(work, "shed.db")
    print(f"the loop outruns the writer: back to back (no sleep), {args.shed_steps} steps, SQLite")
    fl = bench_floor(args.shed_steps, 0.0)
    fl["case"] = "floor, back to back"
    r = bench_klmon(url, "klmon SQLite, back to back", args.shed_steps, 0.0, work / "sp-shed")
    rows.extend((fl, r))
    print(HEADER)
    print(_row(fl))
    print(_row(r))
    s = r["stats"]
    print(
        f"  shed: thinned {s.get('thinned', '-')} steps ({s.get('samples_shed', '-')} samples), "
        f"spilled {s['spilled']} whole steps to the spool; written {s['written']} of "
        f"{args.shed_steps}, flushed {r['flushed']}"
    )
    print(
        f"  calls over 10 ms: {r['over_10ms']}, {r['over_10ms_in_full_gc']} of them during a "
        f"full garbage collection of the process (each stops every thread; "
        f"{len(gc.get_objects())} objects tracked here; pauses {r['full_gcs_ms']} ms) and "
        f"{r['over_10ms_in_young_gc']} during a young one over {SLOW_COLLECTION * 1e3:g} ms "
        f"(pauses {r['young_gcs_ms']} ms); max outside those: {r['max_outside_gc_ms']:.2f} ms; "
        f"max less the caller's wait for a CPU (the machine's load): "
        f"{r['max_less_cpu_wait_ms']:.2f} ms; {r['over_10ms_with_steal']} of the calls over "
        f"10 ms saw steal time (the hypervisor running another guest on this machine's CPUs, "
        f"which a thread's CPU wait does not show): {r['steal_ms']:.0f} ms of it during the loop"
    )
    for name, _ in pg_urls:
        _drop_pg(name)
    return rows


def _medians(rows: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["case"], []).append(r)
    if all(len(v) < 2 for v in by.values()):
        return
    print("  medians of the repeats:")
    for case, rs in by.items():
        med = {"case": case}
        keys = ("p50_ms", "p99_ms", "max_ms", "bg_cpu_ms", "bg_cpu_probed_ms", "gil_ms")
        for k in (*keys, "gil_worst_ms", "bytes"):
            vals = [x[k] for x in rs if x.get(k) is not None and x[k] == x[k]]  # not NaN
            med[k] = float(np.median(vals)) if vals else None
        print(_row(med))
    fl = [r["p99_ms"] for r in by.get("floor: copy 3 arrays", [])]
    for case, rs in by.items():
        if case.startswith("klmon") and fl:
            ratio = np.median([r["p99_ms"] for r in rs]) / np.median(fl)
            print(f"  {case}: log_step p99 = {ratio:.1f}x the floor's p99")


# --- 2. numpy and torch inputs of every float dtype ----------------------------------------------


def _dtype_inputs(kind: str, b: int = 256, t: int = 2048):
    """(lp, ref, mask) as numpy float32, torch float32 or torch bfloat16 (CPU)."""
    lp, ref, mask, _ = _batches(1, b, t)[0]
    if kind == "numpy f32":
        return lp, ref, mask
    import torch

    dtype = torch.float32 if kind == "torch f32" else torch.bfloat16
    return (
        torch.from_numpy(lp).to(dtype),
        torch.from_numpy(ref).to(dtype),
        torch.from_numpy(mask),
    )


def _raw_copy(x):
    """The floor: the array's raw bytes copied by numpy (a bfloat16 tensor as int16)."""
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    import torch

    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return np.array(x.numpy(), copy=True)


def bench_dtypes(url: str, spool: Path, steps: int, step_ms: float) -> list[dict]:
    import monitor

    rows = []
    for kind in ("numpy f32", "torch f32", "torch bf16"):
        try:
            lp, ref, mask = _dtype_inputs(kind)
        except ImportError:
            print(f"  {kind:<11} missing (torch is not installed here)")
            continue
        floor_w, floor_c = np.empty(steps), np.empty(steps)
        call_w, call_c = np.empty(steps), np.empty(steps)
        run = monitor.init(
            "bench", f"dtype-{kind}-{time.time_ns()}", db=url, spool_dir=spool, exit_timeout=5.0
        )
        for step in range(steps):  # floor and call interleaved: the same machine load
            c0, t0 = time.thread_time(), time.perf_counter()
            _raw_copy(lp), _raw_copy(ref), _raw_copy(mask)
            floor_w[step], floor_c[step] = time.perf_counter() - t0, time.thread_time() - c0
            c0, t0 = time.thread_time(), time.perf_counter()
            run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask)
            call_w[step], call_c[step] = time.perf_counter() - t0, time.thread_time() - c0
            time.sleep(step_ms / 1000)
        run.flush(60.0)
        run.finish(timeout=5.0)
        fl, r = _percentiles(floor_w, floor_c), _percentiles(call_w, call_c)
        rows.append({"case": kind, "floor": fl, "log_step": r, "written": run.stats["written"]})
        print(
            f"  {kind:<11} log_step p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms "
            f"(cpu p50 {r['cpu_p50_ms']:.3f}) | floor p50 {fl['p50_ms']:.3f} "
            f"p99 {fl['p99_ms']:.3f} ms | ratio p50 {r['p50_ms'] / fl['p50_ms']:.2f}x "
            f"p99 {r['p99_ms'] / fl['p99_ms']:.2f}x  written {run.stats['written']}",
            flush=True,
        )
    return rows


# --- 3. watch's overhead on a TRL step --------------------------------------------------------


def bench_watch(work: Path, steps: int, repeats: int) -> dict | None:
    try:
        import trl
        from datasets import Dataset
    except ImportError:
        print("  missing (the trl extra is not installed here)")
        return None
    sys.path.insert(0, str(REPO / "tests"))
    from support.trl_tiny import build, sentences

    from monitor.integrations.trl import watch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # a steadier figure on a shared machine
    model = build(work / "tiny")
    times: dict[str, list[float]] = {"without": [], "with": []}
    cpu: dict[str, list[float]] = {"without": [], "with": []}
    plan = [("warm-up", -1)] + [(c, i) for i in range(repeats) for c in ("without", "with")]
    for case, i in plan:
        args = trl.GRPOConfig(
            output_dir=str(work / "out"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            num_generations=4,
            max_completion_length=8,
            max_steps=steps,
            logging_steps=1,
            beta=0.04,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
        )
        trainer = trl.GRPOTrainer(
            model=str(model),
            args=args,
            reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
            train_dataset=Dataset.from_dict({"prompt": sentences(64, seed=1)}),
        )
        if case == "with":
            watch(
                trainer,
                "bench",
                f"watch-{i}",
                db=f"sqlite:///{work}/w{i}.db",
                spool_dir=work / f"wsp{i}",
            )
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.train()
        if case == "warm-up":
            continue
        times[case].append((time.perf_counter() - t0) / steps)
        cpu[case].append((time.process_time() - c0) / steps)
    out = {}
    for label, d in (("wall", times), ("process cpu", cpu)):
        a, b = float(np.median(d["without"])), float(np.median(d["with"]))
        out[label] = (a, b)
        each = ", ".join(f"{x * 1e3:.0f}/{y * 1e3:.0f}" for x, y in zip(*d.values(), strict=True))
        print(
            f"  tiny GRPO step {label} (CPU, {steps} steps x {repeats}, median): without watch "
            f"{a * 1e3:.1f} ms, with {b * 1e3:.1f} ms, overhead {(b / a - 1) * 100:+.1f}% "
            f"(runs without/with: {each} ms)",
            flush=True,
        )
    return {"wall_s": out["wall"], "cpu_s": out["process cpu"], "runs": times, "cpu": cpu}


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=["overhead", "dtypes", "watch"], default="overhead")
    ap.add_argument("--steps", type=int, default=500, help="log_step calls per case")
    ap.add_argument("--step-ms", type=float, default=20.0, help="simulated training step")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of floor/klmon/MLflow")
    ap.add_argument("--shed-steps", type=int, default=300, help="steps of the back-to-back case")
    ap.add_argument("--mlflow-steps", type=int, default=300, help="log_batch calls of MLflow")
    ap.add_argument("--mlflow-python", default=None, help="an interpreter that has mlflow")
    ap.add_argument("--dtype-steps", type=int, default=300, help="log_step calls per dtype")
    ap.add_argument("--watch-steps", type=int, default=10, help="TRL steps per watch run")
    ap.add_argument("--watch-repeats", type=int, default=2, help="runs with and without")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="klmon-bench-"))
    results: dict = {}
    try:
        if args.only == "overhead":
            results["overhead"] = overhead(args, work)
        if args.only == "dtypes":
            print(f"log_step blocking time by input type, (256, 2048), {args.dtype_steps} steps")
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            results["dtypes"] = bench_dtypes(
                _fresh_sqlite(work, "dtypes.db"), work / "spool-dtypes", args.dtype_steps, 20.0
            )
        if args.only == "watch":
            print("watch overhead on a TRL GRPO step (tiny model, CPU)")
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            results["watch"] = bench_watch(work, args.watch_steps, args.watch_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
