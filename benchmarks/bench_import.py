"""`klmon import` end to end, next to the storage's own speed, and the bytes it leaves.

A step table of N rows x 12 columns (a step column and 11 metrics, TRL-like names) is written
as CSV, JSONL and Parquet. Each is imported by the CLI in a child process (`klmon import`,
what a user runs: interpreter start, reading, writing, rollups) into a fresh SQLite file and
a fresh PostgreSQL database; the same rows go into a wide table through raw `sqlite3`
executemany and through PostgreSQL binary COPY, measured in the same run. Bytes on disk: the
SQLite file (and WAL) after the import, and per table where the database can say
(SQLite's dbstat, PostgreSQL's pg_total_relation_size).

``--baseline DIR`` imports every file with the klmon package found in DIR too (an older
checkout: ``git archive <commit> monitor migrations | tar -x -C /tmp/old``), so the figures
before and after a change come from the same run on the same machine.

    python benchmarks/bench_import.py [--rows 200000] [--repeat 3] [--baseline /tmp/old]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NAMES = [
    "loss",
    "learning_rate",
    "reward",
    "kl",
    "entropy",
    "grad_norm",
    "clip_ratio",
    "value_loss",
    "response_length",
    "reward_std",
    "epoch",
]


def make_frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    cols: dict[str, np.ndarray] = {"step": np.arange(rows)}
    for name in NAMES:
        cols[name] = rng.normal(size=rows).round(6)
    cols["learning_rate"] = np.full(rows, 1e-5)
    return pd.DataFrame(cols)


def write_files(frame: pd.DataFrame, folder: Path) -> dict[str, Path]:
    files = {"csv": folder / "log.csv", "jsonl": folder / "log.jsonl"}
    frame.to_csv(files["csv"], index=False)
    frame.to_json(files["jsonl"], orient="records", lines=True)
    try:
        files["parquet"] = folder / "log.parquet"
        frame.to_parquet(files["parquet"])
    except ImportError:
        del files["parquet"]
    return files


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- floors


def raw_sqlite(frame: pd.DataFrame, path: Path) -> int:
    """Raw sqlite3 executemany into a wide table keyed by (run_id, step); returns bytes."""
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    cols = ", ".join(f'"{c}" REAL' for c in NAMES)
    con.execute(f"CREATE TABLE wide (run_id INTEGER, step INTEGER, {cols}, "
                "PRIMARY KEY (run_id, step))")  # fmt: skip
    rows = [(1, *r) for r in frame.itertuples(index=False, name=None)]
    ph = ", ".join(["?"] * (len(NAMES) + 2))
    with con:
        con.executemany(f"INSERT INTO wide VALUES ({ph})", rows)
    con.close()
    return path.stat().st_size


def pg_copy(frame: pd.DataFrame, url: str) -> int:
    """PostgreSQL binary COPY into a wide table keyed by (run_id, step); returns its bytes."""
    import psycopg

    with psycopg.connect(url) as con:
        cols = ", ".join(f'"{c}" float8' for c in NAMES)
        con.execute("DROP TABLE IF EXISTS wide")
        con.execute(
            f"CREATE TABLE wide (run_id int4, step int8, {cols}, PRIMARY KEY (run_id, step))"
        )
        rows = [(1, *r) for r in frame.itertuples(index=False, name=None)]
        with con.cursor().copy("COPY wide FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int8", *["float8"] * len(NAMES)])
            for row in rows:
                copy.write_row(row)
        con.commit()
        return int(con.execute("SELECT pg_total_relation_size('wide')").fetchone()[0])


# --------------------------------------------------------------------------- klmon


def klmon_import(file: Path, url: str, package_root: Path | None) -> float:
    """Wall seconds of `klmon import FILE` in a child process, as installed: modules compiled
    once (``warm_up`` writes what pip would have; PYTHONDONTWRITEBYTECODE is dropped)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["KLMON_DB_URL"] = url
    code = "import sys; from monitor.cli import main; sys.exit(main())"
    if package_root is not None:
        # ahead of the editable install's import hook, which would find this checkout
        code = (
            f"import sys; sys.path.insert(0, {str(package_root)!r}); "
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        ) + code
    cmd = [sys.executable, "-c", code, "import", str(file), "--run", f"r{uuid.uuid4().hex[:6]}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"klmon import failed: {done.stdout}\n{done.stderr}")
    return wall


def sqlite_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """The file (+ WAL) and, where dbstat exists, the bytes of each table with its indexes."""
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    per: dict[str, int] = {}
    con = sqlite3.connect(path)
    try:
        for name, size in con.execute(
            "SELECT tbl_name, SUM(pgsize) FROM dbstat JOIN sqlite_master ON dbstat.name = "
            "sqlite_master.name GROUP BY tbl_name"
        ):
            per[name] = int(size)
    except sqlite3.OperationalError:
        pass
    finally:
        con.close()
    return total, per


def pg_bytes(url: str, tables: list[str]) -> dict[str, int]:
    import psycopg

    with psycopg.connect(url) as con:
        return {
            t: int(con.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0])
            for t in tables
            if con.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is not None
        }


def fresh_pg(admin: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"klmon_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    url = admin.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url, drop


def spread(times: list[float]) -> str:
    """The range of a median's runs."""
    return f"{min(times):.2f}-{max(times):.2f} s"


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a klmon checkout to import with as well")
    ap.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL admin URL ('' to skip)")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    frame = make_frame(args.rows)
    print(f"{args.rows:,} rows x {frame.shape[1]} columns; medians of {args.repeat}; "
          "the machine may be shared: compare figures of this run only")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_files(frame, folder)
        raw_path = folder / "raw.db"
        roots = [("klmon", here)] + ([("baseline", args.baseline)] if args.baseline else [])
        for label, root in roots:  # compiles every module the imports load, as pip would
            for fmt, file in files.items():
                klmon_import(file, f"sqlite:///{folder / f'warm-{label}-{fmt}.db'}", root)
        # The load of a shared machine drifts: each repeat runs the floor and every root in
        # turn, and each format's figures are divided by the floor measured beside them.
        print("\nSQLite: floor = raw sqlite3 executemany into a wide table")
        for fmt, file in files.items():
            floor: list[float] = []
            times: dict[str, list[float]] = {label: [] for label, _ in roots}
            sizes: dict[str, tuple[int, dict[str, int]]] = {}
            for i in range(args.repeat):
                floor.append(median_time(lambda: raw_sqlite(frame, raw_path), 1))
                for label, root in roots:
                    db = folder / f"{label}-{fmt}-{i}.db"
                    times[label].append(klmon_import(file, f"sqlite:///{db}", root))
                    sizes[label] = sqlite_bytes(db)
            raw_s = statistics.median(floor)
            print(f"SQLite  floor    {fmt:8s}                          {raw_s:6.2f} s   "
                  f"{mb(raw_path.stat().st_size)}")  # fmt: skip
            for label, _root in roots:
                t = statistics.median(times[label])
                total, per = sizes[label]
                tables = ", ".join(
                    f"{k} {mb(v)}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4]
                )
                print(f"SQLite  {label:8s} klmon import {fmt:8s}            {t:6.2f} s   "
                      f"{mb(total)}  ({spread(times[label])}; {t / raw_s:.1f}x the floor; "
                      f"{tables})")  # fmt: skip
        if not args.pg:
            return
        print("\nPostgreSQL: floor = binary COPY into a wide table")
        for fmt, file in files.items():
            floor, copy_b = [], 0
            times = {label: [] for label, _ in roots}
            shown: dict[str, str] = {}
            for _ in range(args.repeat):
                url, drop = fresh_pg(args.pg)
                try:
                    floor.append(median_time(lambda u=url: pg_copy(frame, u), 1))
                    copy_b = pg_bytes(url, ["wide"])["wide"]
                finally:
                    drop()
                for label, root in roots:
                    url, drop = fresh_pg(args.pg)
                    try:
                        times[label].append(klmon_import(file, url, root))
                        per = pg_bytes(url, ["steps", "metrics", "metric_blocks",
                                             "metric_rollups", "step_rollups"])  # fmt: skip
                    finally:
                        drop()
                    shown[label] = ", ".join(f"{k} {mb(v)}" for k, v in per.items() if v)
            copy_s = statistics.median(floor)
            print(f"PostgreSQL floor    {fmt:8s}                       {copy_s:6.2f} s   "
                  f"{mb(copy_b)}  ({args.rows / copy_s:,.0f} rows/s)")  # fmt: skip
            for label, _root in roots:
                t = statistics.median(times[label])
                print(f"PostgreSQL {label:8s} klmon import {fmt:8s}         {t:6.2f} s   "
                      f"({spread(times[label])}; {t / copy_s:.1f}x the floor; "
                      f"{shown[label]})")  # fmt: skip


if __name__ == "__main__":
    main()
