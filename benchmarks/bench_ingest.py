"""Ingestion benchmark: how long ``log_step`` blocks the training loop, and how fast the
writer's bulk path stores step rows, next to MLflow's ``log_batch`` measured in the same run.

1. Blocking time of ``Run.log_step`` for a (256, 2048) float32 batch (policy and reference
   log-probs, a bool response mask, rewards, texts, token strings, 2 extra metrics) over
   2,000 steps: p50 / p99 / max, with the database up (SQLite, and PostgreSQL when reachable)
   and down (an unreachable URL: everything goes to the spool). Between calls the loop
   "trains" for ``--step-ms`` (a sleep, as a GPU step would release the GIL); ``--step-ms 0``
   is the back-to-back stress case.
2. Throughput of the bulk path (``monitor.store.step_writes.write_step_records``): 200k
   summary rows (22 quantities each) into SQLite and PostgreSQL (binary COPY), rows/s, next
   to MLflow ``log_batch`` logging the same ~20 scalars per step into a SQLite tracking
   store, points/s.

3. ``--only dtypes``: blocking p50/p99 of ``log_step`` for a (256, 2048) batch given as numpy
   float32, torch float32 and torch bfloat16 (CPU; torch rows need torch installed), each
   next to its copy floor measured in the same run (copying the same arrays' raw bytes).
4. ``--only watch``: wall time of a tiny TRL GRPO run (tests/support/trl_tiny.py, CPU) with and
   without ``monitor.integrations.trl.watch``, interleaved, same seed: watch's overhead per
   training step (needs the ``trl`` extra).

MLflow is not a klmon dependency: the script runs it in its own virtual environment,
``/tmp/mlflow-venv`` (created with ``python -m venv`` and ``pip install mlflow`` on first
use, or pass ``--mlflow-python``). If it cannot be installed, its row says so.

    .venv/bin/python benchmarks/bench_ingest.py                 # everything
    .venv/bin/python benchmarks/bench_ingest.py --only latency --steps 500
    .venv/bin/python benchmarks/bench_ingest.py --only throughput --rows 200000
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
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_URL = os.environ.get("KLMON_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MLFLOW_VENV = Path("/tmp/mlflow-venv")


# --- helpers ----------------------------------------------------------------------------------


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


# --- 1. blocking time of log_step -------------------------------------------------------------


def _batches(n_distinct: int, b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_distinct):
        lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
        ref = np.minimum(lp + rng.normal(0, 0.2, (b, t)).astype(np.float32), 0.0)
        lengths = rng.integers(t // 4, t + 1, size=b)
        mask = np.arange(t)[None, :] < lengths[:, None]
        out.append((lp, ref, mask, rng.normal(size=b)))
    return out


def bench_latency(
    url: str,
    label: str,
    steps: int,
    step_ms: float,
    spool: Path,
    b: int = 256,
    t: int = 2048,
    validate: str = "full",
) -> dict:
    import monitor

    batches = _batches(4, b, t)
    prompts = [f"prompt {i}" for i in range(b)]
    responses = [f"response {i}" for i in range(b)]
    tokens = [[f"tok{j}" for j in range(t)] for _ in range(b)]
    run = monitor.init(
        "bench",
        f"latency-{label}-{time.time_ns()}",
        db=url,
        spool_dir=spool,
        config={"kl_coef": 0.05},
        exit_timeout=5.0,
        validate=validate,
    )
    times = np.empty(steps)
    cpu = np.empty(steps)
    gc.collect()
    wall0 = time.perf_counter()
    for step in range(steps):
        lp, ref, mask, rewards = batches[step % len(batches)]
        c0 = time.thread_time()
        t0 = time.perf_counter()
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
        cpu[step] = time.thread_time() - c0
        if step_ms > 0:
            time.sleep(step_ms / 1000)
    loop_s = time.perf_counter() - wall0
    flushed = run.flush(60.0)
    stats = run.stats
    run.finish(timeout=5.0)
    return {
        "case": label,
        **_percentiles(times, cpu),
        "loop_s": loop_s,
        "flushed": flushed,
        "stats": stats,
    }


def bench_copy_floor(steps: int, step_ms: float, b: int = 256, t: int = 2048) -> dict:
    """What any correct client must at least do: copy the two log-prob arrays and the mask."""
    batches = _batches(4, b, t)
    times = np.empty(steps)
    cpu = np.empty(steps)
    for step in range(steps):
        lp, ref, mask = batches[step % len(batches)][:3]
        c0 = time.thread_time()
        t0 = time.perf_counter()
        np.array(lp, copy=True)
        np.array(ref, copy=True)
        np.array(mask, copy=True)
        times[step] = time.perf_counter() - t0
        cpu[step] = time.thread_time() - c0
        if step_ms > 0:
            time.sleep(step_ms / 1000)
    return {"case": "floor (copies only)", **_percentiles(times, cpu), "step_ms": step_ms}


def _percentiles(wall: np.ndarray, cpu: np.ndarray) -> dict:
    """Wall time the caller was blocked, and the CPU time of the calling thread (the work done
    on it, without the time it was preempted by other processes: this machine is shared)."""
    w, c = wall * 1e3, cpu * 1e3
    return {
        "p50_ms": float(np.percentile(w, 50)),
        "p99_ms": float(np.percentile(w, 99)),
        "max_ms": float(w.max()),
        "cpu_p50_ms": float(np.percentile(c, 50)),
        "cpu_p99_ms": float(np.percentile(c, 99)),
        "cpu_max_ms": float(c.max()),
    }


def _line(label: str, gap: float, r: dict, extra: str) -> str:
    return (
        f"  {label:<14} gap {gap:>4.0f} ms  wall p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} "
        f"max {r['max_ms']:.2f} ms | thread cpu p50 {r['cpu_p50_ms']:.3f} "
        f"p99 {r['cpu_p99_ms']:.3f} max {r['cpu_max_ms']:.2f} ms  {extra}"
    )


# --- 3. numpy and torch inputs of every float dtype ----------------------------------------------


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


# --- 4. watch's overhead on a TRL step --------------------------------------------------------


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


# --- 2. throughput of the bulk path -------------------------------------------------------------


def _step_records(n: int, start: int = 0):
    from monitor.store.models import STEP_QUANTITIES
    from monitor.store.step_writes import StepRecord

    rng = np.random.default_rng(1)
    vals = rng.random((n, len(STEP_QUANTITIES)))
    vals[:, -2:] = np.floor(vals[:, -2:] * 1000)
    rows = vals.tolist()
    ints = len(STEP_QUANTITIES) - 2
    recs = []
    for i, r in enumerate(rows):
        q = (*r[:ints], int(r[ints]), int(r[ints + 1]))
        recs.append(StepRecord(start + i, 1.7e9 + i, f"{i:032x}", q))
    return recs


def bench_bulk(url: str, rows: int, batch: int) -> float:
    from monitor.store.database import Database
    from monitor.store.runs import get_or_create_run
    from monitor.store.step_writes import write_step_records

    db = Database.open(url)
    run = get_or_create_run(db, "bench", f"bulk-{time.time_ns()}")
    recs = _step_records(rows)
    t0 = time.perf_counter()
    for i in range(0, rows, batch):
        res = write_step_records(db, run.id, recs[i : i + batch])
        assert res.inserted == len(recs[i : i + batch]), res
    dt = time.perf_counter() - t0
    db.dispose()
    return rows / dt


def bench_sqlite_floor(url: str, rows: int, batch: int) -> float:
    """The same step tuples through stdlib sqlite3 executemany, one row per statement, no klmon
    code at all: what this machine gives right now (the box is shared; compare ratios)."""
    import sqlite3

    from monitor.store.steps import STEP_COLUMNS

    path = url.removeprefix("sqlite:///")
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(
        "INSERT INTO runs (project, name, status, source, created_at, last_seen_at, "
        "world_size, config, tags) VALUES ('bench', 'floor', 'running', 'live', 0, 0, "
        "1, '{}', '[]')"
    )
    run_id = con.execute("SELECT max(id) FROM runs").fetchone()[0]
    con.commit()
    tuples = [
        (run_id, r.step, r.wall_time, r.status, r.reject_reason, 1, r.payload_hash, *r.values)
        for r in _step_records(rows)
    ]
    sql = (
        f"INSERT INTO steps ({', '.join(STEP_COLUMNS)}) VALUES "
        f"({', '.join('?' * len(STEP_COLUMNS))}) ON CONFLICT (run_id, step) DO NOTHING"
    )
    t0 = time.perf_counter()
    for i in range(0, rows, batch):
        with con:
            con.executemany(sql, tuples[i : i + batch])
    dt = time.perf_counter() - t0
    con.close()
    return rows / dt


MLFLOW_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, tempfile
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    steps, per_step, batch_steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    d = tempfile.mkdtemp()
    uri = f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench", artifact_location=f"{d}/art")
    run = client.create_run(exp)
    names = [f"m{i}" for i in range(per_step)]
    t0 = time.perf_counter()
    ts = int(time.time() * 1000)
    for s0 in range(0, steps, batch_steps):
        last = min(steps, s0 + batch_steps)
        ms = [Metric(n, float(s * 0.001 + i), ts, s) for s in range(s0, last)
              for i, n in enumerate(names)]
        client.log_batch(run.info.run_id, metrics=ms)
    dt = time.perf_counter() - t0
    print(steps * per_step / dt)
    """
)


def _mlflow_python(explicit: str | None) -> str | None:
    if explicit:
        if shutil.which(explicit) is None and not Path(explicit).is_file():
            print(f"  --mlflow-python {explicit}: no such interpreter")
            return None
        return explicit
    py = MLFLOW_VENV / "bin" / "python"
    if py.exists():
        ok = subprocess.run([str(py), "-c", "import mlflow"], capture_output=True)
        if ok.returncode == 0:
            return str(py)
    print(f"  creating {MLFLOW_VENV} and installing mlflow (once; not a klmon dependency) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "mlflow-skinny", "sqlalchemy", "alembic"],
            check=True,
            timeout=900,
        )
        subprocess.run([str(py), "-c", "import mlflow"], check=True, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"  mlflow could not be installed: {exc}")
        return None
    return str(py)


def bench_mlflow(python: str | None, steps: int, per_step: int) -> float | None:
    if python is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(MLFLOW_SCRIPT)
    try:
        out = subprocess.run(
            [python, f.name, str(steps), str(per_step), "50"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        print("  mlflow run failed:", out.stderr.strip().splitlines()[-1:])
        return None
    return float(out.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=["latency", "throughput", "dtypes", "watch"], default=None)
    ap.add_argument("--dtype-steps", type=int, default=300, help="log_step calls per dtype")
    ap.add_argument("--watch-steps", type=int, default=10, help="TRL steps per watch run")
    ap.add_argument("--watch-repeats", type=int, default=2, help="runs with and without")
    ap.add_argument("--steps", type=int, default=2000, help="log_step calls per case")
    ap.add_argument("--step-ms", type=float, default=100.0, help="simulated training step")
    ap.add_argument("--stress", action="store_true", help="also run back-to-back (--step-ms 0)")
    ap.add_argument("--stress-steps", type=int, default=300, help="steps of the stress cases")
    ap.add_argument("--rows", type=int, default=200_000, help="step rows for throughput")
    ap.add_argument("--batch", type=int, default=20_000, help="rows per transaction")
    ap.add_argument("--mlflow-steps", type=int, default=2000)
    ap.add_argument("--mlflow-python", default=None)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    from monitor.store.models import STEP_QUANTITIES

    work = Path(tempfile.mkdtemp(prefix="klmon-bench-"))
    results: dict = {}
    try:
        if args.only in (None, "dtypes"):
            print(f"log_step blocking time by input type, (256, 2048), {args.dtype_steps} steps")
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            results["dtypes"] = bench_dtypes(
                _fresh_sqlite(work, "dtypes.db"), work / "spool-dtypes", args.dtype_steps, 20.0
            )
        if args.only == "watch":
            print("watch overhead on a TRL GRPO step (tiny model, CPU)")
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            results["watch"] = bench_watch(work, args.watch_steps, args.watch_repeats)
        if args.only in (None, "latency"):
            print(f"log_step blocking time, (256, 2048) float32, {args.steps} steps")
            cases = [("sqlite-up", _fresh_sqlite(work, "lat.db"), args.step_ms)]
            cases.append(("sqlite-up shape", cases[0][1], args.step_ms))
            pg = _fresh_pg("klmon_bench_latency")
            if pg:
                cases.append(("postgres-up", pg, args.step_ms))
            cases.append(("db-down", f"sqlite:///{work}/no/such/dir/x.db", args.step_ms))
            if pg:
                cases.append(("pg-down", "postgresql://postgres@127.0.0.1:1/none", args.step_ms))
            if args.stress:
                cases.append(("sqlite-up b2b", cases[0][1], 0.0))
                cases.append(("db-down b2b", f"sqlite:///{work}/no/such/dir/y.db", 0.0))
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            fl = bench_copy_floor(args.steps, args.step_ms)
            print(_line("floor", args.step_ms, fl, "(np.array copies, no klmon)"), flush=True)
            rows = [fl]
            for label, url, gap in cases:
                n = args.stress_steps if gap == 0 else args.steps
                r = bench_latency(
                    url,
                    label,
                    n,
                    gap,
                    work / f"spool-{label.replace(' ', '-')}",
                    validate="shapes" if "shape" in label else "full",
                )
                r["step_ms"] = gap
                rows.append(r)
                s = r["stats"]
                extra = f"acked {s['acknowledged']} written {s['written']} spilled {s['spilled']}"
                print(_line(label, gap, r, extra), flush=True)
                print(f"  (load average now: {os.getloadavg()[0]:.1f})", flush=True)
            results["latency"] = rows
            if pg:
                _drop_pg("klmon_bench_latency")

        if args.only in (None, "throughput"):
            n_q = len(STEP_QUANTITIES)
            print(f"bulk path: {args.rows} step rows ({n_q} quantities), {args.batch} per txn")
            print(f"  (load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            sq = bench_bulk(_fresh_sqlite(work, "bulk.db"), args.rows, args.batch)
            print(f"  SQLite      {sq:>12,.0f} rows/s  ({sq * n_q:,.0f} points/s)")
            floor = bench_sqlite_floor(_fresh_sqlite(work, "floor.db"), args.rows, args.batch)
            print(f"  (stdlib sqlite3 executemany, same tuples, no klmon: {floor:,.0f} rows/s)")
            pg = _fresh_pg("klmon_bench_bulk")
            pgr = None
            if pg:
                pgr = bench_bulk(pg, args.rows, args.batch)
                print(f"  PostgreSQL  {pgr:>12,.0f} rows/s  ({pgr * n_q:,.0f} points/s)")
                _drop_pg("klmon_bench_bulk")
            per_step = 20
            ml = bench_mlflow(_mlflow_python(args.mlflow_python), args.mlflow_steps, per_step)
            if ml is None:
                print("  MLflow log_batch (SQLite store): missing (mlflow not available)")
            else:
                print(
                    f"  MLflow log_batch (SQLite store, {per_step}/step) {ml:>10,.0f} points/s = "
                    f"{ml / per_step:,.0f} steps/s"
                )
                print(
                    f"  ratio SQLite/MLflow: {sq * n_q / ml:,.0f}x points/s, "
                    f"{sq / (ml / per_step):,.0f}x steps/s"
                )
            results["throughput"] = {
                "sqlite_rows_s": sq,
                "sqlite_floor_rows_s": floor,
                "postgres_rows_s": pgr,
                "mlflow_points_s": ml,
                "quantities_per_row": n_q,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
