"""Attacks on the live client (issue: never wedge, never lie), each measured: how many of the
steps around a hostile one reach the database, what flush()/finish() say, what run.stats counts.

Run:  python benchmarks/ingest_attacks.py [--db URL] [--only NAME]
Disk-full attacks need root (they mount a 1 MiB tmpfs) and are skipped otherwise. Prints one
table row per attack; compare a checkout before and after a change on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import monitor
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.runs import find_run_by_name
from monitor.store.schema import upgrade
from monitor.store.steps import read_steps

logging.getLogger("klmon").setLevel(logging.CRITICAL)


def batch(seed: int, b: int = 4, t: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    return {"policy_logprobs": lp, "ref_logprobs": np.minimum(lp + 0.1, 0.0)}


def stored(url: str, name: str) -> tuple[list[int], list[str]]:
    db = Database.open(url)
    try:
        info = find_run_by_name(db, "attack", name)
        if info is None:
            return [], []
        df = read_steps(db, info.id)
        return df["step"].tolist(), df["status"].tolist()
    finally:
        db.dispose()


def around(url: str, spool: Path, bad: Callable[[monitor.Run], object], n: int = 6) -> str:
    """Steps 0..n-1, step n//2 replaced by ``bad``; how many reach the database."""
    name = f"a-{uuid.uuid4().hex[:8]}"
    run = monitor.init("attack", name, db=url, spool_dir=spool, flush_interval=0.01)
    refused = ""
    for step in range(n):
        if step == n // 2:
            try:
                bad_step = bad(run)
                if bad_step is not None:
                    continue
            except Exception as exc:
                refused = f"refused at call ({type(exc).__name__})"
            continue
        run.log_step(step, **batch(step))
    t0 = time.monotonic()
    fin = run.finish(timeout=10)
    dt = time.monotonic() - t0
    steps, status = stored(url, name)
    rej = sum(1 for s in status if s == "rejected")
    others = sum(1 for s in steps if s != n // 2)
    extra = f"; dead_letter={run.stats.get('dead_letter', '-')}"
    return (
        f"{others}/{n - 1} others stored, hostile step: "
        f"{'stored' if n // 2 in steps else refused or 'lost'}"
        f"{' (rejected)' if rej else ''}; finish={fin} ({dt:.1f}s){extra}"
    )


def texts(s: str) -> Callable[[monitor.Run], object]:
    def bad(run: monitor.Run) -> None:
        b = batch(99)
        run.log_step(3, **b, texts=([s] * 4, ["ok"] * 4))

    return bad


def metric(name: str, value: object = 1.0) -> Callable[[monitor.Run], object]:
    def bad(run: monitor.Run) -> None:
        run.log_step(3, **batch(99), metrics={name: value})

    return bad


def long_name(url: str, spool: Path) -> str:
    name = "n" * 300
    try:
        run = monitor.init("attack", name, db=url, spool_dir=spool)
    except Exception as exc:
        return f"refused at init ({type(exc).__name__}: {str(exc)[:60]})"
    for step in range(5):
        run.log_step(step, **batch(step))
    fin = run.finish(timeout=10)
    return f"accepted at init; finish={fin}; stored={len(stored(url, name)[0])}/5"


def huge(url: str, spool: Path) -> str:
    name = f"huge-{uuid.uuid4().hex[:6]}"
    run = monitor.init("attack", name, db=url, spool_dir=spool, flush_interval=0.01)
    rng = np.random.default_rng(0)
    lp = -rng.exponential(1.0, (1024, 32768)).astype(np.float32)
    ref = np.minimum(lp + 0.05, 0.0)
    t0 = time.monotonic()
    _copies = (np.array(lp, copy=True), np.array(ref, copy=True))  # the floor: two copies
    floor = time.monotonic() - t0
    del _copies
    t0 = time.monotonic()
    run.log_step(0, policy_logprobs=lp, ref_logprobs=ref)
    call = time.monotonic() - t0
    del lp, ref
    for step in range(1, 4):
        run.log_step(step, **batch(step))
    t1 = time.monotonic()
    ok = run.flush(60)
    wait = time.monotonic() - t1
    cpu0 = time.process_time()
    time.sleep(2)
    idle_cpu = (time.process_time() - cpu0) / 2
    fin = run.finish(timeout=10)
    steps, _ = stored(url, name)
    return (
        f"call {call:.2f}s (2 copies: {floor:.2f}s); flush={ok} after {wait:.1f}s; "
        f"stored {sorted(steps)}; "
        f"idle CPU {idle_cpu:.0%}; finish={fin}"
    )


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path | None]:
    d = Path(tempfile.mkdtemp(prefix="klmon-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=False)
    try:
        yield None if r.returncode else d
    finally:
        if not r.returncode:
            subprocess.run(["umount", str(d)], check=False)
        with contextlib.suppress(OSError):
            d.rmdir()


def full_disk(url: str, _spool: Path, n: int = 100) -> str:
    with tmpfs("1m") as d:
        if d is None:
            return "skipped (mount not permitted)"
        name = f"full-{uuid.uuid4().hex[:6]}"
        run = monitor.init("attack", name, db=url, spool_dir=d, flush_interval=0.01)
        for step in range(n):
            run.log_step(step, **batch(step, b=32, t=512))
        fl = run.flush(30)
        fin = run.finish(timeout=30)
        steps, _ = stored(url, name)
        return (
            f"{len(steps)}/{n} stored; flush={fl} finish={fin}; "
            f"dropped={run.stats.get('dropped', '-')}"
        )


def full_disk_db_down(url: str, _spool: Path, n: int = 300) -> str:
    with tmpfs("1m") as d:
        if d is None:
            return "skipped (mount not permitted)"
        down = f"sqlite:///{d}/no/such/x.db"
        run = monitor.init("attack", "down", db=down, spool_dir=d, flush_interval=0.01)
        for step in range(n):
            run.log_step(step, **batch(step, b=32, t=512))
        fl = run.flush(2)
        fin = run.finish(timeout=2)
        st = run.stats
        return (
            f"flush={fl} finish={fin}; acknowledged={st['acknowledged']} "
            f"dropped={st.get('dropped', '-')} (of {n})"
        )


def sync_surrogate(url: str, spool: Path) -> str:
    """An old spool file whose record holds a lone surrogate, then a good file: klmon sync."""
    from click.testing import CliRunner

    from monitor.cli import main
    from monitor.ingest.spool import SpoolRecord, encode_record, iter_records, spool_files

    d = spool / "sync"
    down = f"sqlite:///{spool}/no/such/x.db"
    for name in ("s1-bad", "s2-good"):
        run = monitor.init("attack", name, db=down, spool_dir=d)
        for step in range(3):
            run.log_step(step, **batch(step), texts=(["p"] * 4, ["r"] * 4))
        run.finish(timeout=0.2)
    bad = next(p for p in spool_files(d) if "s1-bad" in p.name)
    rec = next(
        r.record
        for r in iter_records(bad)
        if isinstance(r, SpoolRecord) and r.record.get("step") == 2
    )
    rec = {**rec, "step": 3, "hash": "x", "metrics": [["m\udcff", 1.0]]}
    rec["samples"] = [{**s, "prompt": "\udcff"} for s in rec["samples"]]
    bad.write_bytes(bad.read_bytes() + encode_record(rec))
    out = CliRunner().invoke(main, ["sync", "--spool-dir", str(d), "--db", url])
    s1 = len(stored(url, "s1-bad")[0])
    s2 = len(stored(url, "s2-good")[0])
    err = type(out.exception).__name__ if out.exception else "ok"
    return f"exit={out.exit_code} ({err}); s1-bad {s1}/4 stored; s2-good {s2}/3 stored"


ATTACKS: dict[str, Callable[[str, Path], str]] = {
    "surrogate in texts": lambda u, s: around(u, s, texts("a\udcffb")),
    "surrogate in metric name": lambda u, s: around(u, s, metric("m\udcff")),
    "NUL in texts": lambda u, s: around(u, s, texts("a\x00b")),
    "NUL in metric name": lambda u, s: around(u, s, metric("m\x00x")),
    "run name of 300 chars": long_name,
    "metrics={'m': 10**400}": lambda u, s: around(u, s, metric("m", 10**400)),
    "(1024, 32768) float32 step": huge,
    "sync: surrogate in a spool file": sync_surrogate,
    "spool on a full disk, DB up": full_disk,
    "spool on a full disk, DB up, 3000 back-to-back": lambda u, s: full_disk(u, s, 3000),
    "spool on a full disk, DB down": full_disk_db_down,
}


@contextlib.contextmanager
def throwaway_pg(admin_url: str | None) -> Iterator[str | None]:
    if admin_url is None:
        yield None
        return
    from sqlalchemy import text

    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"klmon_attacks_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{admin_url.rpartition('/')[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    ap.add_argument("--only", default=None, help="run the attacks whose name contains this")
    ap.add_argument("--skip", default=None, help="skip the attacks whose name contains this")
    ap.add_argument(
        "--pg", default=None, help="admin URL of a PostgreSQL: run on a throwaway database there"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, throwaway_pg(args.pg) as pg:
        url = pg or args.db or f"sqlite:///{tmp}/attacks.db"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        for name, attack in ATTACKS.items():
            if (args.only and args.only not in name) or (args.skip and args.skip in name):
                continue
            spool = Path(tmp) / f"spool-{uuid.uuid4().hex[:6]}"
            t0 = time.monotonic()
            try:
                result = attack(url, spool)
            except Exception as exc:
                result = f"CRASH {type(exc).__name__}: {str(exc)[:80]}"
            print(f"| {name} | {result} | {time.monotonic() - t0:.1f}s |", flush=True)
    os._exit(0)  # do not wait for wedged writer threads


if __name__ == "__main__":
    main()
