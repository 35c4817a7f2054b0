"""Faults: the database down at start, locked or stopped mid-run, the logging process killed
with -9, many processes on one SQLite file, damaged spool files, exit with the database down,
the training loop outrunning the writer. Each checks: no step lost, none duplicated, the
training loop not blocked."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.db import down_url, migrated_sqlite
from support.pg_cluster import ThrowawayCluster

import monitor
from monitor.cli import main as cli
from monitor.ingest import writer as writer_mod
from monitor.ingest.spool import CorruptRecord, SpoolRecord, iter_records, spool_files
from monitor.ingest.sync import sync_spool
from monitor.store.database import Database
from monitor.store.drilldown import read_samples
from monitor.store.runs import find_run_by_name, get_run
from monitor.store.steps import read_steps


def batch(seed: int, b: int = 4, t: int = 12):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.3, (b, t)).astype(np.float32), 0.0)
    return lp, ref, np.ones((b, t), dtype=bool)


def log_steps(run: monitor.Run, steps, latencies: list[float] | None = None) -> None:
    for step in steps:
        lp, ref, mask = batch(step)
        t0 = time.perf_counter()
        run.log_step(step, policy_logprobs=lp, ref_logprobs=ref, mask=mask, metrics={"m": step})
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)


def stored_steps(db_url: str, project: str, name: str) -> list[int]:
    db = Database.open(db_url)
    try:
        info = find_run_by_name(db, project, name)
        return [] if info is None else read_steps(db, info.id)["step"].tolist()
    finally:
        db.dispose()


# --- database down at start; sync into a database that never heard of the run ---------------


def test_database_down_then_sync_creates_the_run(db_url: str, tmp_path) -> None:
    spool = tmp_path / "spool"
    run = monitor.init(
        "proj", "offline", db=down_url(db_url, tmp_path), spool_dir=spool, flush_interval=0.01
    )
    lat: list[float] = []
    log_steps(run, range(20), lat)
    assert not run.flush(0.5)
    stats = run.stats
    assert stats["acknowledged"] == 20 and stats["written"] == 0 and stats["db_errors"] >= 1
    assert not run.finish(timeout=0.5), "nothing could reach the database"
    assert max(lat) < 0.05
    assert len(spool_files(spool)) == 1
    out = CliRunner().invoke(cli, ["sync", "--spool-dir", str(spool), "--db", db_url])
    assert out.exit_code == 0, out.output
    assert "20 steps: 20 new, 0 already stored, 0 conflicts" in out.output
    assert "run created" in out.output
    assert stored_steps(db_url, "proj", "offline") == list(range(20))
    db = Database.open(db_url)
    info = find_run_by_name(db, "proj", "offline")
    assert info is not None and info.status == "finished"
    assert len(read_samples(db, info.id, 7)) == 4  # 3 top + 1 random of a batch of 4
    db.dispose()
    assert spool_files(spool) == []
    again = CliRunner().invoke(cli, ["sync", "--spool-dir", str(spool), "--db", db_url])
    assert "no spool files" in again.output


def test_sync_help_has_an_example() -> None:
    out = CliRunner().invoke(cli, ["sync", "--help"])
    assert out.exit_code == 0 and "Example:" in out.output and "klmon sync" in out.output


# --- SQLite locked by another connection mid-run ------------------------------------------------


def test_sqlite_locked_mid_run_blocks_nothing_and_loses_nothing(tmp_path) -> None:
    path = tmp_path / "locked.db"
    url = migrated_sqlite(path)
    run = monitor.init("proj", "locked", db=url, spool_dir=tmp_path / "sp", flush_interval=0.01)
    log_steps(run, range(10))
    assert run.flush(20)
    locker = sqlite3.connect(path, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")  # every other writer now waits or fails
    lat: list[float] = []
    try:
        t_end = time.monotonic() + 3.0
        step = 10
        while time.monotonic() < t_end:
            log_steps(run, [step], lat)
            step += 1
            time.sleep(0.02)
        assert not run.flush(0.2), "nothing can be written while the lock is held"
        assert run.stats["acknowledged"] == step, "yet every step is in the spool"
    finally:
        locker.rollback()
        locker.close()
    assert run.flush(40)
    run.finish()
    print(f"sqlite lock: {step} steps, max log_step {max(lat) * 1e3:.2f} ms, {run.stats}")
    assert stored_steps(url, "proj", "locked") == list(range(step))
    assert run.stats["conflicts"] == 0
    assert max(lat) < 0.05, f"log_step blocked {max(lat) * 1e3:.1f} ms"


# --- PostgreSQL stopped and started mid-run ---------------------------------------------------


@pytest.mark.slow
def test_postgres_stopped_mid_run(throwaway_pg: ThrowawayCluster, tmp_path) -> None:
    """The server stopped for 5 s and started again under a live run: nothing lost, nothing
    doubled, log_step never blocks. Runs on a private cluster (initdb on a free port), never
    on the machine's shared one."""
    pg_migrated_url = throwaway_pg.url
    run = monitor.init(
        "proj", "pg-outage", db=pg_migrated_url, spool_dir=tmp_path / "sp", flush_interval=0.01
    )
    log_steps(run, range(10))
    assert run.flush(30)
    lat: list[float] = []
    step = 10
    try:
        throwaway_pg.stop()
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end:
            log_steps(run, [step], lat)
            step += 1
            time.sleep(0.05)
    finally:
        throwaway_pg.start()
    log_steps(run, range(step, step + 5), lat)
    step += 5
    assert run.flush(60), run.stats
    stats = run.stats
    run.finish()
    print(f"pg outage: {step} steps, max log_step {max(lat) * 1e3:.2f} ms, stats {stats}")
    assert stored_steps(pg_migrated_url, "proj", "pg-outage") == list(range(step))
    assert stats["db_errors"] >= 1 and stats["spooled"] >= 1 and stats["replayed"] >= 1
    assert stats["conflicts"] == 0
    assert max(lat) < 0.05, f"log_step blocked {max(lat) * 1e3:.1f} ms"


# --- kill -9 -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np
    import monitor
    run = monitor.init("proj", {name!r}, db={url!r}, spool_dir={spool!r}, flush_interval=0.01)
    rng = np.random.default_rng(0)
    step = 0
    while True:
        lp = -rng.exponential(1.0, (4, 12)).astype(np.float32)
        run.log_step(step, policy_logprobs=lp, ref_logprobs=np.minimum(lp + 0.1, 0))
        step += 1
        print("logged", step, "acked", run.stats["acknowledged"], flush=True)
        time.sleep(0.005)
    """
)


@pytest.mark.parametrize("database", ["up", "down"])
def test_kill_9_loses_no_acknowledged_step(database: str, db_url: str, tmp_path) -> None:
    if database == "down" and not db_url.startswith("sqlite"):
        pytest.skip("the down case is covered on SQLite")
    spool = tmp_path / "spool"
    url = db_url if database == "up" else down_url(db_url, tmp_path)
    code = CHILD.format(name=f"killed-{database}", url=url, spool=str(spool))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    acked = logged = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            _, lg, _, ak = line.split()
            logged, acked = int(lg), max(acked, int(ak))
            if acked >= 40:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert acked >= 40, proc.stderr.read() if proc.stderr else ""
    db = Database.open(db_url)
    reports = sync_spool(db, spool)
    db.dispose()
    assert [r.action for r in reports] == ["deleted"], [r.describe() for r in reports]
    got = stored_steps(db_url, "proj", f"killed-{database}")
    # every acknowledged step is stored, exactly once; at most the unacknowledged tail is lost
    assert got[:acked] == list(range(acked))
    assert got == list(range(len(got))) and acked <= len(got) <= logged
    db = Database.open(db_url)
    info = find_run_by_name(db, "proj", f"killed-{database}")
    assert info is not None and get_run(db, info.id).status == "crashed"
    db.dispose()


# --- 8 processes, one SQLite file, a reader polling -------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, numpy as np
    import monitor
    rank = int(sys.argv[1])
    run = monitor.init("proj", f"worker-{{rank}}", db={url!r}, spool_dir={spool!r},
                       flush_interval=0.01, exit_timeout=60)
    rng = np.random.default_rng(rank)
    for step in range({steps}):
        lp = -rng.exponential(1.0, (4, 12)).astype(np.float32)
        run.log_step(step, policy_logprobs=lp, ref_logprobs=np.minimum(lp + 0.1, 0),
                     metrics={{"loss": float(step)}})
    ok = run.finish(timeout=60)
    print(json.dumps(dict(run.stats, finished=ok)))
    """
)


@pytest.mark.slow
def test_eight_processes_one_sqlite_file_with_a_reader(sqlite_url: str, tmp_path) -> None:
    from monitor.store.runs import list_runs

    url = sqlite_url
    steps = 25
    code = WORKER.format(url=url, spool=str(tmp_path / "sp"), steps=steps)
    reader_errors: list[BaseException] = []
    polls = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal polls
        db = Database.open(url)
        while not stop.is_set():
            try:
                for rid in list_runs(db)["id"].tolist():
                    read_steps(db, int(rid), columns=["kl_mean"])
                polls += 1
            except BaseException as exc:  # pragma: no cover - reported below
                reader_errors.append(exc)
            time.sleep(0.01)
        db.dispose()

    t = threading.Thread(target=reader)
    t.start()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    stop.set()
    t.join()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "database is locked" not in err
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["finished"] and stats["written"] == steps and stats["conflicts"] == 0
    assert not reader_errors, reader_errors[:1]
    assert polls > 0
    for r in range(8):
        assert stored_steps(url, "proj", f"worker-{r}") == list(range(steps))


# --- damaged spool files, live files ---------------------------------------------------------


def _offline_spool(tmp_path: Path, n: int) -> Path:
    spool = tmp_path / "spool"
    run = monitor.init("proj", "damaged", db=down_url("sqlite", tmp_path), spool_dir=spool)
    log_steps(run, range(n))
    run.flush(0.2)
    run.finish(timeout=0.2)
    (path,) = spool_files(spool)
    return path


def test_corrupt_record_is_reported_and_the_rest_replayed(db_url: str, tmp_path) -> None:
    path = _offline_spool(tmp_path, 10)
    steps = [r for r in iter_records(path) if isinstance(r, SpoolRecord)]
    victim = next(r for r in steps if r.record.get("step") == 4)
    data = bytearray(path.read_bytes())
    data[victim.offset + 30] ^= 0x55
    data = data[:-7]  # and a truncated tail (the final status record)
    path.write_bytes(bytes(data))
    db = Database.open(db_url)
    (report,) = sync_spool(db, path.parent)
    db.dispose()
    assert len(report.corrupt) == 2
    assert {c.reason for c in report.corrupt} >= {"checksum mismatch"}
    assert report.inserted == 9
    assert "damaged record at byte" in report.describe()
    assert stored_steps(db_url, "proj", "damaged") == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    assert spool_files(path.parent) == [], "a quarantined file is not replayed again"


def test_sync_skips_the_files_of_live_processes(db_url: str, tmp_path) -> None:
    spool = tmp_path / "spool"
    run = monitor.init("proj", "alive", db=down_url(db_url, tmp_path), spool_dir=spool)
    log_steps(run, range(3))
    run.flush(0.2)
    db = Database.open(db_url)
    (report,) = sync_spool(db, spool)
    assert report.action == "skipped" and "running process" in (report.reason or "")
    run.finish(timeout=0.2)
    (report,) = sync_spool(db, spool)
    assert report.action == "deleted" and report.inserted == 3
    db.dispose()


def test_a_file_without_a_run_record_is_quarantined(db_url: str, tmp_path) -> None:
    path = _offline_spool(tmp_path, 3)
    first = next(r for r in iter_records(path) if isinstance(r, SpoolRecord))
    data = bytearray(path.read_bytes())
    data[first.offset + 20] ^= 0xFF  # the run record itself
    path.write_bytes(bytes(data))
    db = Database.open(db_url)
    (report,) = sync_spool(db, path.parent)
    db.dispose()
    assert report.action == "skipped" and "which run" in (report.reason or "")
    assert any(isinstance(c, CorruptRecord) for c in report.corrupt)
    assert path.with_name(path.name + ".corrupt").exists()


# --- interpreter exit -----------------------------------------------------------------------

EXITING = textwrap.dedent(
    """
    import sys, numpy as np
    import monitor
    run = monitor.init("proj", "exits", db={url!r}, spool_dir={spool!r}, exit_timeout=1.0)
    for step in range(5):
        lp = -np.ones((2, 3), dtype=np.float32)
        run.log_step(step, policy_logprobs=lp, ref_logprobs=lp * 2)
    {ending}
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["pass", "raise SystemExit(3)", "raise RuntimeError('boom')"])
def test_exit_with_the_database_down_is_quick_and_keeps_the_steps(
    ending: str, db_url: str, tmp_path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("exit behaviour does not depend on the backend")
    spool = tmp_path / "spool"
    code = EXITING.format(url=down_url(db_url, tmp_path), spool=str(spool), ending=ending)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"exit took {elapsed:.1f} s"
    assert "klmon sync" in proc.stderr  # the user is told where the steps are
    db = Database.open(db_url)
    sync_spool(db, spool)
    info = find_run_by_name(db, "proj", "exits")
    assert info is not None
    assert read_steps(db, info.id)["step"].tolist() == [0, 1, 2, 3, 4]
    want = "crashed" if "RuntimeError" in ending else "finished"
    assert get_run(db, info.id).status == want
    db.dispose()


# --- the training loop outruns the writer -----------------------------------------------------


def test_a_full_queue_spills_to_the_spool_without_blocking(
    db_url: str, tmp_path, monkeypatch
) -> None:
    real = writer_mod.summarize_item

    def slow(*args, **kwargs):
        time.sleep(0.05)  # a processor far slower than the training loop
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "summarize_item", slow)
    run = monitor.init(
        "proj",
        "spill",
        db=db_url,
        spool_dir=tmp_path / "sp",
        queue_size=2,
        flush_interval=0.01,
    )
    lat: list[float] = []
    for step in range(30):
        lp, ref, mask = batch(step)
        t0 = time.perf_counter()
        run.log_step(
            step,
            policy_logprobs=lp,
            ref_logprobs=ref,
            mask=mask,
            texts=([f"p{i}" for i in range(4)], [f"r{i}" for i in range(4)]),
            tokens=[[f"t{j}" for j in range(12)]] * 4,
        )
        lat.append(time.perf_counter() - t0)
    stats = run.stats
    assert stats["spilled"] >= 10
    assert max(lat) < 0.04, "a spill writes the raw step; it never waits for the processor"
    assert run.flush(60)
    run.finish()
    assert stored_steps(db_url, "proj", "spill") == list(range(30))
    db = Database.open(db_url)
    info = find_run_by_name(db, "proj", "spill")
    assert info is not None
    samples = read_samples(db, info.id, 29)
    assert len(samples) == 4 and samples[0].prompt is not None
    db.dispose()


def test_spool_files_are_private(tmp_path) -> None:
    path = _offline_spool(tmp_path, 1)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_sync_dry_run_reads_and_leaves_the_files(db_url: str, tmp_path) -> None:
    path = _offline_spool(tmp_path, 4)
    out = CliRunner().invoke(
        cli, ["sync", "--spool-dir", str(path.parent), "--db", db_url, "--dry-run"]
    )
    assert out.exit_code == 0, out.output
    assert "proj/damaged (rank 0): 4 steps" in out.output and "dry run" in out.output
    assert path.exists() and stored_steps(db_url, "proj", "damaged") == []


def test_segments_roll_over_and_written_ones_are_deleted(db_url: str, tmp_path, monkeypatch):
    import functools

    from monitor.ingest import client

    monkeypatch.setattr(
        client, "SpoolWriter", functools.partial(client.SpoolWriter, max_segment_bytes=4096)
    )
    spool = tmp_path / "sp"
    run = monitor.init("proj", "segments", db=db_url, spool_dir=spool, flush_interval=0.01)
    log_steps(run, range(40))
    assert run.flush(30)
    assert run._spool.segment > 3, "the spool rolled over several times"
    assert len(spool_files(spool)) == 1, "written segments are deleted, the active one stays"
    run.finish()
    assert spool_files(spool) == []
    assert stored_steps(db_url, "proj", "segments") == list(range(40))
