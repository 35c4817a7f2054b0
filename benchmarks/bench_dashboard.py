"""Compare page data callbacks: server time and payload at 10k, 100k and 1M steps per run.

Builds 8 runs per size in SQLite (and PostgreSQL when reachable) with fast bulk inserts
(executemany of tuples; PostgreSQL binary COPY), stores their chart rollups once (timed
separately: a one-time cost per run), then POSTs the Compare page's callbacks to the app's
own Flask server in-process, as the browser would:

* ``render``: the page load (all charts of all runs, smoothing on, as in
  ``/compare?runs=...&smooth=0.9``),
* ``zoom``: a zoom to the middle 1% of the run (the finer level is fetched),
* ``live``: a live update after 10 new steps were written to every run.

Beside them, in the same run, a naive baseline that reads every step of the runs and sends
the KL chart alone with every point (a lower bound for a dashboard that reads everything).

Many runs (``--many-runs N``, SQLite): N runs of ``--many-steps`` steps each, then the time of
``klmon runs``'s read (``run_summaries``, and ``list_runs`` as a DataFrame) and of the Runs
page's data (``DashboardData.runs_overview``), next to today's query measured in the same run:
the counting SQL of list_runs before run counters (every step counted on each call, then each
run's current KL looked up one by one); and the Runs page with every run still running, its
stall input from the wall times kept on ``runs`` next to the read before them (each running
run's latest step rows), alternated in one run, with the same statuses asserted. Then
``klmon runs`` as a whole process, next to Python alone, a raw SQL list (the floor) and the
same list through SQLAlchemy (``Database.open`` and ``run_summaries``: what the command did
before it read through the driver alone). Keep the database with ``--many-sqlite PATH``:
1,000 x 100,000 steps is about 45 GB and takes half an hour to build on a loaded machine.

Extra metrics (``--metric-steps N``): one run with ``--metric-names`` metrics of N steps each,
written through ``write_metrics``; then the one-time rollup build and the chart reads of a
metric (``read_metric_series`` of the whole run, of 10% and 1% of it, the live tail, the
alert engine's suffix read of the last 1,000 steps, the export's whole read) and the bytes
the metrics take. ``--baseline DIR`` runs the same script with the klmon package in DIR (an
older checkout, e.g. the long-row layout before metric blocks) in the same run, on SQLite and
PostgreSQL.

Token ledger (``--ledger``, SQLite): runs with a synthetic token ledger of 64 rows per step
(K = 32 per side: 8 hot ids in every step, 56 from a 113k-id vocabulary), built once into a
cached file (``--ledger-sqlite``, default under /tmp), 8 runs of ``--ledger-steps`` steps plus
one run of ``--ledger-big-steps``. Prints the bytes per step of the raw ledger and of its
rollups, their one-time build, and the drift-vocabulary reads over long ranges
(``read_token_ledger``, ``read_token_ledger_buckets``, ``token_changes``) next to the naive
full scan of the same range (the GROUP BY over the raw rows that the reads ran before the
rollups), measured in the same run.

Run:  .venv/bin/python benchmarks/bench_dashboard.py [--sizes 10000,100000,1000000]
      [--runs 8] [--repeat 5] [--sqlite PATH] [--pg URL | --no-pg] [--reuse]
      .venv/bin/python benchmarks/bench_dashboard.py --no-sqlite --no-pg --many-runs 1000
      [--many-steps 100000] [--many-sqlite PATH]
      .venv/bin/python benchmarks/bench_dashboard.py --no-sqlite --no-pg --metric-steps 300000
      [--metric-names 3] [--baseline /tmp/old]
      .venv/bin/python benchmarks/bench_dashboard.py --no-sqlite --no-pg --ledger
      [--ledger-runs 8] [--ledger-steps 100000] [--ledger-big-steps 1000000]
Target: render <= 150 ms and <= 1 MB for 8 x 1M steps, flat in run length; listing 1,000 runs
<= 150 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.charts.panel import panel_specs
from monitor.charts.view import View
from monitor.dashboard import DashboardSettings, create_app
from monitor.store import series as store_series
from monitor.store.current_kl import current_kl
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.run_counters import recount
from monitor.store.runs import get_or_create_run, list_runs, run_summaries, set_run_status
from monitor.store.schema import upgrade
from monitor.store.steps import read_steps

COLUMNS = (
    "kl_mean",
    "kl_std",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_max",
    "k1",
    "k2",
    "k3",
    "neg_kl_frac",
    "top1pct_share",
    "resp_len_mean",
    "policy_nll",
    "entropy_mean",
    "reward_mean",
    "kl_coef",
    "rollout_gap",
)
CHUNK = 200_000


def synthetic(n: int, seed: int, offset: int = 0) -> np.ndarray:
    """(n, 2 + len(COLUMNS)) rows: step, wall_time and plausible values with one spike."""
    rng = np.random.default_rng(seed)
    steps = np.arange(offset, offset + n, dtype=float)
    t = steps / max(1.0, offset + n)
    kl = 14 * (1 - np.exp(-5 * t)) + rng.normal(0, 0.4, n)
    if offset == 0:
        kl[n // 3] = 80.0  # a one-step spike
    out = np.empty((n, 2 + len(COLUMNS)))
    out[:, 0] = steps
    out[:, 1] = 1.7e9 + steps * 2.0
    vals = {
        "kl_mean": kl,
        "kl_std": np.abs(rng.normal(3, 0.3, n)),
        "kl_p05": kl - 5,
        "kl_p50": kl,
        "kl_p95": kl + 6,
        "kl_max": kl + 12,
        "k1": kl / 200,
        "k2": kl / 180,
        "k3": kl / 190,
        "neg_kl_frac": np.clip(rng.normal(0.1, 0.02, n), 0, 1),
        "top1pct_share": np.clip(rng.normal(0.2, 0.03, n), 0, 1),
        "resp_len_mean": 200 + rng.normal(0, 5, n),
        "policy_nll": 1.5 - 0.3 * t + rng.normal(0, 0.02, n),
        "entropy_mean": 1.4 - 0.3 * t + rng.normal(0, 0.02, n),
        "reward_mean": np.sqrt(np.maximum(kl, 0)) * 0.5 + rng.normal(0, 0.1, n),
        "kl_coef": np.full(n, 0.05),
        "rollout_gap": rng.normal(0, 0.01, n),
    }
    for j, c in enumerate(COLUMNS):
        out[:, 2 + j] = vals[c]
    return out


def insert_steps(db: Database, run_id: int, arr: np.ndarray) -> None:
    names = ["run_id", "step", "wall_time", "status", "ranks_seen", *COLUMNS]
    if db.is_sqlite:
        sql = f"INSERT INTO steps ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        for i in range(0, len(arr), CHUNK):
            part = arr[i : i + CHUNK]
            rows = [
                (run_id, int(r[0]), r[1], "ok", 1, *r[2:])
                for r in part.tolist()  # Python floats: what sqlite3 binds fastest
            ]
            with db.begin() as conn:
                conn.exec_driver_sql(sql, rows)
        _recount(db, run_id)
        return
    from psycopg.types.numeric import Float8  # noqa: F401 - binary COPY types

    raw = db.engine.raw_connection()
    try:
        copy_sql = f"COPY steps ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
        with raw.cursor() as cur, cur.copy(copy_sql) as cp:  # type: ignore[attr-defined]
            cp.set_types(["int4", "int8", "float8", "varchar", "int4", *["float8"] * len(COLUMNS)])
            for r in arr.tolist():
                cp.write_row((run_id, int(r[0]), r[1], "ok", 1, *r[2:]))
        raw.commit()
    finally:
        raw.close()
    _recount(db, run_id)


def _recount(db: Database, run_id: int) -> None:
    """The run counters the step writers keep: these rows went in behind their back."""
    with db.begin() as conn:
        recount(conn, db.paramstyle, [run_id])


def build(
    db: Database, sizes: list[int], runs: int
) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Runs per size (reused when present), and the one-time rollup build seconds per size."""
    ids: dict[int, list[int]] = {}
    rollup_s: dict[int, float] = {}
    for n in sizes:
        ids[n] = []
        t_roll = 0.0
        for i in range(runs):
            run = get_or_create_run(
                db,
                "bench",
                f"n{n}-r{i}",
                config={"kl_coef": 0.05, "seed": i, "lr": 1e-6 * (1 + i % 2)},
            )
            ids[n].append(run.id)
            _, last = store_series.step_bounds(db, run.id)
            if last is None:
                t0 = time.perf_counter()
                insert_steps(db, run.id, synthetic(n, seed=i))
                took = time.perf_counter() - t0
                print(f"  inserted {n:>9,} steps for run {run.id} in {took:6.1f} s", flush=True)
            set_run_status(db, run.id, "finished")
            t0 = time.perf_counter()
            store_series.refresh_rollups(db, run.id)
            t_roll += time.perf_counter() - t0
        rollup_s[n] = t_roll
    return ids, rollup_s


class Client:
    """POSTs the Compare page's callbacks as the browser does."""

    def __init__(self, app: Any) -> None:
        self.client = app.server.test_client()
        deps = self.client.get("/_dash-dependencies").get_json()
        self.render_out = next(
            d["output"]
            for d in deps
            if "cmp-live.data..." in d["output"] and ".figure" in d["output"]
        )
        self.live_out = next(
            d["output"] for d in deps if ".extendData" in d["output"] and '"cmp"' in d["output"]
        )

    @staticmethod
    def gid(k: str) -> dict[str, str]:
        return {"chart": k, "panel": "cmp", "type": "kl-graph"}

    def render(
        self, view: View, keys: list[str], relayout: dict[str, Any] | None = None, live: Any = None
    ) -> tuple[float, int, dict[str, Any]]:
        body = {
            "output": self.render_out,
            "outputs": [
                [{"id": self.gid(k), "property": "figure"} for k in keys],
                {"id": "cmp-live", "property": "data"},
                {"id": "cmp-interval", "property": "disabled"},
                {"id": "cmp-msg", "property": "children"},
                {"id": "cmp-permalink", "property": "href"},
                {"id": "cmp-smooth-value", "property": "children"},
                [
                    {
                        "id": {"chart": k, "panel": "cmp", "type": "kl-chart-box"},
                        "property": "style",
                    }
                    for k in keys
                ],
                {"id": "cmp-empty", "property": "children"},
            ],
            "inputs": [
                {"id": "cmp-smooth", "property": "value", "value": view.smooth},
                {"id": "cmp-x", "property": "value", "value": view.x},
                {
                    "id": "cmp-klaxis",
                    "property": "value",
                    "value": "log" if view.kl_log else "linear",
                },
                [
                    {
                        "id": self.gid(k),
                        "property": "relayoutData",
                        "value": relayout if k == "kl" else None,
                    }
                    for k in keys
                ],
            ],
            "changedPropIds": [
                json.dumps(self.gid("kl"), sort_keys=True, separators=(",", ":")) + ".relayoutData"
            ]
            if relayout
            else ["cmp-smooth.value"],
            "state": [
                {"id": "cmp-view", "property": "data", "value": view.to_dict()},
                {"id": "cmp-live", "property": "data", "value": live},
            ],
        }
        t0 = time.perf_counter()
        r = self.client.post("/_dash-update-component", json=body)
        dt = time.perf_counter() - t0
        assert r.status_code == 200, (r.status_code, r.data[:300])
        return dt, len(r.data), r.get_json()["response"]

    def live(self, keys: list[str], live: Any) -> tuple[float, int, dict[str, Any]]:
        body = {
            "output": self.live_out,
            "outputs": [
                [{"id": self.gid(k), "property": "extendData"} for k in keys],
                {"id": "cmp-live", "property": "data"},
                {"id": "cmp-status", "property": "children"},
            ],
            "inputs": [{"id": "cmp-interval", "property": "n_intervals", "value": 1}],
            "changedPropIds": ["cmp-interval.n_intervals"],
            "state": [{"id": "cmp-live", "property": "data", "value": live}],
        }
        t0 = time.perf_counter()
        r = self.client.post("/_dash-update-component", json=body)
        dt = time.perf_counter() - t0
        assert r.status_code in (200, 204), (r.status_code, r.data[:300])
        return (
            dt,
            len(r.data),
            (r.get_json() or {}).get("response", {}) if r.status_code == 200 else {},
        )


def naive(db: Database, run_ids: list[int]) -> tuple[float, int]:
    """Read every step of every run; send the KL chart with every point as JSON lists."""
    t0 = time.perf_counter()
    traces = []
    for rid in run_ids:
        df = read_steps(db, rid, columns=["step", "kl_mean"])
        traces.append({"type": "scatter", "x": df["step"].tolist(), "y": df["kl_mean"].tolist()})
    payload = json.dumps({"data": traces, "layout": {}})
    return time.perf_counter() - t0, len(payload)


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def bench_backend(
    label: str, url: str, sizes: list[int], runs: int, repeat: int
) -> list[dict[str, Any]]:
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    db = Database.open(url)
    print(f"[{label}] building data ...", flush=True)
    ids, rollup_s = build(db, sizes, runs)
    app = create_app(DashboardSettings(db_url=url), db=db)
    client = Client(app)
    results = []
    for n in sizes:
        view = View(tuple(ids[n]), smooth=0.9)
        keys = [s.key for s in panel_specs(view, {})]
        client.render(view, keys)  # warm-up
        renders, zooms, lives = [], [], []
        size_render = size_zoom = size_live = 0
        for _ in range(repeat):
            app.klmon_data.clear_cache()
            dt, size_render, resp = client.render(view, keys)
            renders.append(dt)
        spike_ok = _spike_visible(resp, n)
        lo, hi = int(n * 0.495), int(n * 0.505)
        for _ in range(repeat):
            dt, size_zoom, _ = client.render(
                view, keys, relayout={"xaxis.range[0]": lo, "xaxis.range[1]": hi}
            )
            zooms.append(dt)
        # live: mark the runs running, write 10 new steps each, extend
        live_state = resp["cmp-live"]["data"]
        for rid in ids[n]:
            set_run_status(db, rid, "running")
        app.klmon_data.clear_cache()
        _, _, resp2 = client.render(view, keys)
        live_state = resp2["cmp-live"]["data"]
        for k in range(repeat):
            for i, rid in enumerate(ids[n]):
                insert_steps(db, rid, _tail_rows(n + 10 * k, i))
            dt, size_live, lresp = client.live(keys, live_state)
            lives.append(dt)
            if lresp:
                live_state = lresp["cmp-live"]["data"]
        for rid in ids[n]:
            _delete_after(db, rid, n - 1)
            set_run_status(db, rid, "finished")
        t_naive, size_naive = naive(db, ids[n])
        row = {
            "backend": label,
            "steps_per_run": n,
            "runs": len(ids[n]),
            "rollup_build_s": rollup_s[n],
            "render_ms": median_ms(renders),
            "render_bytes": size_render,
            "zoom_ms": median_ms(zooms),
            "zoom_bytes": size_zoom,
            "live_ms": median_ms(lives),
            "live_bytes": size_live,
            "naive_ms": t_naive * 1000,
            "naive_bytes": size_naive,
            "spike_visible": spike_ok,
        }
        results.append(row)
        print(
            f"[{label}] {n:>9,} steps x {len(ids[n])}: render {row['render_ms']:.0f} ms "
            f"{size_render / 1e3:.0f} kB | zoom {row['zoom_ms']:.0f} ms | "
            f"live {row['live_ms']:.0f} ms | naive {row['naive_ms']:.0f} ms "
            f"{size_naive / 1e6:.1f} MB",
            flush=True,
        )
    db.dispose()
    return results


def _tail_rows(start: int, seed: int) -> np.ndarray:
    arr = synthetic(10, seed=1000 + seed)
    arr[:, 0] = np.arange(start, start + 10)
    arr[:, 1] = 1.7e9 + arr[:, 0] * 2.0
    return arr


def _delete_after(db: Database, run_id: int, step: int) -> None:
    """Undo the live part's extra steps (and any rollup bucket they completed)."""
    with db.begin() as conn:
        for table in ("steps", "step_rollups"):
            col = "step" if table == "steps" else "step_max"
            conn.exec_driver_sql(
                f"DELETE FROM {table} WHERE run_id = {int(run_id)} AND {col} > {int(step)}"
            )


def _spike_visible(resp: dict[str, Any], n: int) -> bool:
    """The KL chart's largest plotted value is the spike (80)."""
    import base64

    fig = next(
        (v["figure"] for k, v in resp.items() if '"chart":"kl"' in k and "figure" in v), None
    )
    if not fig:
        return False
    best = -np.inf
    for tr in fig.get("data", []):
        y = tr.get("y")
        if isinstance(y, dict) and y.get("dtype") == "f4":
            arr = np.frombuffer(base64.b64decode(y["bdata"]), dtype="<f4").astype(float)
        elif isinstance(y, list):
            arr = np.array([v for v in y if v is not None], dtype=float)
        else:
            continue
        if len(arr) and np.isfinite(arr).any():
            best = max(best, float(np.nanmax(arr)))
    return bool(best >= 79.99)


#: ``list_runs`` before run counters: every stored step counted on each call.
OLD_LIST_SQL = """
    SELECT r.id, r.project, r.name, r.status, r.source, r.created_at, r.last_seen_at,
           COALESCE(agg.n_steps, 0) AS n_steps, agg.last_step
    FROM runs r
    LEFT JOIN (
        SELECT run_id, COUNT(*) AS n_steps, MAX(step) AS last_step
        FROM steps GROUP BY run_id
    ) agg ON agg.run_id = r.id
    ORDER BY r.id
"""


def old_list_runs(db: Database) -> list[tuple[Any, ...]]:
    """Today's query before the counters: the counting SQL, then each run's current KL."""
    with db.begin() as conn:
        rows = conn.exec_driver_sql(OLD_LIST_SQL).all()
    return [(*r, current_kl(db, int(r[0])) if r[7] else None) for r in rows]


def _best_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def bench_many_runs(url: str, n_runs: int, steps: int, repeat: int) -> dict[str, Any]:
    """N runs of ``steps`` steps; the run list and the Runs page data, old and new."""
    from monitor.dashboard.data import DashboardData

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    db = Database.open(url)
    t_build = time.perf_counter()
    for i in range(n_runs):
        run = get_or_create_run(db, "many", f"r{i}", config={"seed": i})
        _, last = store_series.step_bounds(db, run.id)
        if last is None:
            insert_steps(db, run.id, synthetic(steps, seed=i))
            set_run_status(db, run.id, "finished")
            store_series.refresh_rollups(db, run.id)
        if (i + 1) % 100 == 0:
            print(
                f"  {i + 1:>5} runs of {steps:,} steps ({time.perf_counter() - t_build:.0f} s)",
                flush=True,
            )
    new = run_summaries(db)
    old = old_list_runs(db)
    db.dispose()
    processes = bench_klmon_runs(url, repeat)
    db = Database.open(url)
    # the same answer: counts, last steps and current KL
    assert [(r["id"], r["n_steps"], r["last_step"], r["last_kl"]) for r in new] == [
        (r[0], r[7], r[8], None if r[9] is None else r[9].value) for r in old
    ]
    return {
        "runs": n_runs,
        "steps_per_run": steps,
        "old_ms": _best_ms(lambda: old_list_runs(db), repeat),
        "summaries_ms": _best_ms(lambda: run_summaries(db), repeat),
        "list_runs_ms": _best_ms(lambda: list_runs(db), repeat),
        # a fresh DashboardData each time: its cache would otherwise answer
        "overview_ms": _best_ms(lambda: DashboardData(db).runs_overview(), repeat),
        **_overview_all_running(db, repeat),
        **processes,
    }


# The extra-metrics bench, run in a child process with this checkout or --baseline's package
# (argv: url, steps, names, repeat); prints one JSON object.
METRIC_CHILD = r"""
import json, statistics, sys, time
import numpy as np
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.runs import get_or_create_run
from monitor.store.schema import upgrade
from monitor.store import series
from monitor.store.steps import read_metrics_by_suffix, read_metrics_long, write_metrics

url, n, k, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = make_engine(url)
upgrade(engine)
engine.dispose()
db = Database.open(url)
run = get_or_create_run(db, "bench", "metrics")
rng = np.random.default_rng(0)
names = [f"train/metric_{i}" for i in range(k)]
t0 = time.perf_counter()
for name in names:
    vals = rng.normal(size=n)
    for lo in range(0, n, 100_000):
        part = range(lo, min(n, lo + 100_000))
        write_metrics(db, run.id, [(s, name, float(vals[s])) for s in part])
out = {"write_s": time.perf_counter() - t0}
t0 = time.perf_counter()
for name in names:
    series.refresh_metric_rollups(db, run.id, name)
out["rollups_s"] = time.perf_counter() - t0

def ms(fn):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)

name, mid = names[0], n // 2
read = series.read_metric_series
out["full_ms"] = ms(lambda: read(db, run.id, name))
out["zoom10_ms"] = ms(lambda: read(db, run.id, name, start=mid, end=mid + n // 10))
out["zoom1_ms"] = ms(lambda: read(db, run.id, name, start=mid, end=mid + n // 100))
out["live_ms"] = ms(lambda: series.read_metric_rows_after(db, run.id, name, n - 11))
last = dict(start=n - 1000, end=n)
out["suffix_ms"] = ms(lambda: read_metrics_by_suffix(db, run.id, ["metric_0"], **last))
out["export_s"] = ms(lambda: read_metrics_long(db, run.id)) / 1e3
SQLITE_BYTES = ("SELECT SUM(pgsize) FROM dbstat WHERE name IN "
                "(SELECT name FROM sqlite_master WHERE tbl_name = ?)")
PG_BYTES = "SELECT COALESCE(pg_total_relation_size(to_regclass(%s)), 0)"
out["bytes"] = {}
with db.begin() as conn:
    for t in ("metrics", "metric_blocks", "metric_rollups"):
        try:
            sql = SQLITE_BYTES if url.startswith("sqlite") else PG_BYTES
            out["bytes"][t] = int(conn.exec_driver_sql(sql, (t,)).scalar() or 0)
        except Exception:
            pass
print(json.dumps(out))
"""


def bench_metrics(
    url: str, steps: int, names: int, repeat: int, package_root: Path | None
) -> dict[str, Any]:
    """The extra-metrics bench in a child process (see METRIC_CHILD) with this checkout, or
    with the klmon package in ``package_root``."""
    import subprocess

    code = METRIC_CHILD
    if package_root is not None:  # ahead of the editable install's import hook
        code = (
            f"import sys; sys.path.insert(0, {str(package_root)!r}); "
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        ) + code
    done = subprocess.run(
        [sys.executable, "-c", code, url, str(steps), str(names), str(repeat)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"metric bench failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_metric_benches(args: argparse.Namespace) -> None:
    """This checkout and --baseline, on SQLite and PostgreSQL, printed side by side."""
    roots = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for backend in ("sqlite", "postgresql"):
        for label, root in roots:
            if backend == "sqlite":
                tmp = tempfile.mkdtemp(prefix="klmon-bench-")
                url = f"sqlite:///{tmp}/metrics.db"
                r = bench_metrics(url, args.metric_steps, args.metric_names, args.repeat, root)
            else:
                from sqlalchemy import text

                admin = make_engine(args.pg, isolation_level="AUTOCOMMIT")
                name = f"klmon_bench_{uuid.uuid4().hex[:8]}"
                try:
                    with admin.connect() as conn:
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                except Exception as exc:
                    print(f"[postgresql] skipped: {str(exc).splitlines()[0]}")
                    admin.dispose()
                    break
                try:
                    url = f"{args.pg.rpartition('/')[0]}/{name}"
                    r = bench_metrics(url, args.metric_steps, args.metric_names, args.repeat, root)
                finally:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()
            rows.append((backend, label, r))
    print(
        f"\nExtra metrics: 1 run x {args.metric_names} metrics x {args.metric_steps:,} steps "
        f"(medians of {args.repeat}; same run, shared machine)"
    )
    head = (
        f"{'backend':<11}{'code':<9}| {'write s':>7} {'rollups s':>9} | {'full ms':>7} "
        f"{'10% ms':>7} {'1% ms':>6} {'live ms':>7} {'alerts ms':>9} | {'export s':>8} | bytes"
    )
    print(head)
    print("-" * len(head))
    for backend, label, r in rows:
        size = ", ".join(f"{t} {b / 1e6:.1f} MB" for t, b in r["bytes"].items() if b)
        print(
            f"{backend:<11}{label:<9}| {r['write_s']:>7.1f} {r['rollups_s']:>9.2f} | "
            f"{r['full_ms']:>7.1f} {r['zoom10_ms']:>7.1f} {r['zoom1_ms']:>6.1f} "
            f"{r['live_ms']:>7.1f} {r['suffix_ms']:>9.1f} | {r['export_s']:>8.2f} | {size}"
        )


def _overview_all_running(db: Database, repeat: int) -> dict[str, float]:
    """The Runs page data when every run is still running (their step interval tells a
    stall): from the wall times the writers keep on ``runs`` (now), and, in the same run and
    alternating with it, from each running run's latest step rows (the read before 0011,
    ``old_latest_rows``). Both give the same statuses. Best and median of ``repeat`` ms."""
    from monitor.dashboard import data as page_data

    now = time.time()  # one clock for both: runs created minutes ago cross their stall limit

    def overview(old: bool) -> Any:
        kept = page_data.recent_walls
        if old:
            page_data.recent_walls = old_latest_rows  # type: ignore[assignment]
        try:
            return page_data.DashboardData(db, clock=lambda: now).runs_overview()
        finally:
            page_data.recent_walls = kept

    with db.begin() as conn:
        conn.exec_driver_sql("UPDATE runs SET status = 'running'")
    try:
        statuses = overview(False)["status"]
        assert statuses.tolist() == overview(True)["status"].tolist()
        mix = statuses.value_counts().to_dict()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeat):
            for old in (True, False):
                t0 = time.perf_counter()
                overview(old)
                times[old].append(1e3 * (time.perf_counter() - t0))
    finally:
        with db.begin() as conn:
            conn.exec_driver_sql("UPDATE runs SET status = 'finished'")
    return {
        "overview_running_statuses": mix,
        "overview_running_ms": min(times[False]),
        "overview_running_median_ms": statistics.median(times[False]),
        "overview_running_old_ms": min(times[True]),
        "overview_running_old_median_ms": statistics.median(times[True]),
    }


def old_latest_rows(db: Database, run_ids: list[int]) -> dict[int, list[tuple[Any, ...]]]:
    """The Runs page's stall input before the kept wall times: each running run's 21 latest
    step rows (step, wall_time), newest first, in two statements (each run's 21st newest
    step, then a UNION ALL of each run's index range from there)."""
    if not run_ids:
        return {}
    ids = ", ".join(str(int(r)) for r in run_ids)
    out: dict[int, list[tuple[Any, ...]]] = {}
    with db.begin() as conn:
        bounds = conn.exec_driver_sql(
            "SELECT r.id, COALESCE((SELECT s.step FROM steps s WHERE s.run_id = r.id "
            "ORDER BY s.step DESC LIMIT 1 OFFSET 20), "
            f"(SELECT MIN(s.step) FROM steps s WHERE s.run_id = r.id)) FROM runs r "
            f"WHERE r.id IN ({ids})"
        ).all()
        bounds = [(int(r), int(lo)) for r, lo in bounds if lo is not None]
        for i in range(0, len(bounds), 400):
            sql = " UNION ALL ".join(
                f"SELECT run_id, step, wall_time FROM steps WHERE run_id = {r} AND step >= {lo}"
                for r, lo in bounds[i : i + 400]
            )
            for row in conn.exec_driver_sql(sql).all():
                out.setdefault(int(row[0]), []).append(tuple(row[1:]))
    for rows in out.values():
        rows.sort(key=lambda r: r[0], reverse=True)
    return out


#: The floor of `klmon runs`: Python starts, lists the runs with one raw SQL statement.
RAW_LIST = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
for row in con.execute("SELECT id, project, name, status, n_steps, last_step FROM runs"):
    print(*row)
"""
#: `klmon runs`'s read before it went through the driver alone: Database.open (SQLAlchemy,
#: the models, the schema check) and run_summaries.
THROUGH_SQLALCHEMY = """
import sys
from monitor.store.database import Database
from monitor.store.runs import run_summaries
for r in run_summaries(Database.open(sys.argv[1])):
    print(r["id"], r["name"], r["n_steps"], r["last_kl"])
"""


def bench_klmon_runs(url: str, repeat: int) -> dict[str, float]:
    """Whole processes, as a user runs them (median ms): ``klmon runs`` next to Python alone,
    the raw SQL list and the same list through SQLAlchemy, interleaved."""
    import subprocess

    klmon = Path(sys.executable).with_name("klmon")
    path = url.removeprefix("sqlite:///")
    commands = {
        "python_ms": [sys.executable, "-c", "pass"],
        "raw_sql_ms": [sys.executable, "-c", RAW_LIST, path],
        "sqlalchemy_ms": [sys.executable, "-c", THROUGH_SQLALCHEMY, url],
        "klmon_runs_ms": [str(klmon), "runs", "--db", url],
    }
    # as installed: modules compiled once (a warm-up run writes what pip would have)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times: dict[str, list[float]] = {k: [] for k in commands}
    for i in range(max(repeat, 5) + 1):
        for key, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(
                cmd, check=True, stdout=subprocess.DEVNULL, cwd=Path(path).parent, env=env
            )
            if i:
                times[key].append(time.perf_counter() - t0)
    return {k: median_ms(v) for k, v in times.items()}


LEDGER_HOT = 8  # ids present in every step of the synthetic ledger
LEDGER_ROWS = 64  # rows per step (K = 32 per side)
LEDGER_CHUNK = 16_384  # steps per insert statement


def synthetic_ledger(
    steps: np.ndarray, seed: int
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Ledger rows (step, token_id, count, lr_sum) and step masses of ``steps``: 8 hot ids in
    every step (one grows over the run), 56 others, distinct by construction."""
    rng = np.random.default_rng(seed + int(steps[0]))
    n = len(steps)
    cold = 1000 + np.arange(LEDGER_ROWS - LEDGER_HOT) * 2000 + rng.integers(0, 2000, (n, 56))
    ids = np.concatenate([np.broadcast_to(np.arange(100, 100 + LEDGER_HOT), (n, 8)), cold], 1)
    sums = rng.exponential(0.05, (n, LEDGER_ROWS))
    sums[:, 0] += 0.5 + steps / max(1, int(steps[-1]))  # the growing token
    sums[:, 1:LEDGER_HOT] += 0.2
    sums[:, LEDGER_ROWS // 2 :] *= -1.0
    counts = rng.integers(1, 50, (n, LEDGER_ROWS))
    step_col = np.repeat(steps, LEDGER_ROWS)
    rows = list(
        zip(
            step_col.tolist(),
            ids.reshape(-1).tolist(),
            counts.reshape(-1).tolist(),
            sums.reshape(-1).tolist(),
            strict=True,
        )
    )
    pos = np.maximum(sums, 0).sum(1) * 1.1
    neg = np.minimum(sums, 0).sum(1) * 1.1
    masses = list(zip(steps.tolist(), [400_000] * n, pos.tolist(), neg.tolist(), strict=True))
    return rows, masses


def build_ledger_run(db: Database, name: str, n_steps: int, seed: int) -> int:
    run = get_or_create_run(db, "ledger", name)
    with db.begin() as conn:
        have = conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM token_ledger_steps WHERE run_id = {run.id}"
        ).scalar()
    if have == n_steps:
        return run.id
    t0 = time.perf_counter()
    for lo in range(0, n_steps, LEDGER_CHUNK):
        steps = np.arange(lo, min(n_steps, lo + LEDGER_CHUNK), dtype=np.int64)
        rows, masses = synthetic_ledger(steps, seed)
        with db.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO token_ledger (run_id, step, token_id, count, lr_sum) "
                f"VALUES ({run.id}, ?, ?, ?, ?)",
                rows,
            )
            conn.exec_driver_sql(
                f"INSERT INTO token_ledger_steps (run_id, step, n_tokens, pos_mass, neg_mass) "
                f"VALUES ({run.id}, ?, ?, ?, ?)",
                masses,
            )
    print(f"  built {name}: {n_steps:,} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return run.id


def ledger_bytes_per_step(path: str) -> tuple[float, float]:
    """Bytes per step of the raw ledger tables and of their rollups (SQLite's dbstat)."""
    import sqlite3

    def pages(table: str) -> int:
        sql = "SELECT SUM(pgsize) FROM dbstat WHERE name = ?"
        names = (table, f"sqlite_autoindex_{table}_1")
        return sum(int(conn.execute(sql, (n,)).fetchone()[0] or 0) for n in names)

    conn = sqlite3.connect(path)
    try:
        steps = conn.execute("SELECT COUNT(*) FROM token_ledger_steps").fetchone()[0]
        raw = sum(pages(t) for t in ("token_ledger", "token_ledger_steps"))
        roll = sum(pages(t) for t in ("token_ledger_rollups", "token_ledger_rollup_masses"))
    finally:
        conn.close()
    return raw / steps, roll / steps


def naive_ledger(db: Database, run_id: int, lo: int, hi: int, k: int) -> list[Any]:
    """The reads before the rollups: a GROUP BY over every raw row of the range, and the
    range's masses."""
    with db.begin() as conn:
        conn.exec_driver_sql(
            "SELECT SUM(pos_mass), SUM(neg_mass), SUM(n_tokens), COUNT(*) FROM token_ledger_steps"
            f" WHERE run_id = {run_id} AND step >= {lo} AND step <= {hi}"
        ).one()
        return conn.exec_driver_sql(
            "SELECT token_id, SUM(count), SUM(lr_sum), COUNT(*) FROM token_ledger "
            f"WHERE run_id = {run_id} AND step >= {lo} AND step <= {hi} GROUP BY token_id "
            f"HAVING SUM(lr_sum) > 0 ORDER BY SUM(lr_sum) DESC, token_id LIMIT {k}"
        ).all()


def bench_ledger(path: str, n_runs: int, steps: int, big_steps: int, repeat: int) -> None:
    from monitor.store import (
        read_token_ledger,
        read_token_ledger_buckets,
        refresh_ledger_rollups,
        token_changes,
    )

    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    db = Database.open(url)
    big = build_ledger_run(db, f"big-{big_steps}", big_steps, 99)
    t0 = time.perf_counter()
    refresh_ledger_rollups(db, big)
    big_build = time.perf_counter() - t0
    ids = [build_ledger_run(db, f"r{i}-{steps}", steps, i) for i in range(n_runs)]
    t0 = time.perf_counter()
    for run_id in ids:
        refresh_ledger_rollups(db, run_id)
    build = time.perf_counter() - t0
    raw_b, roll_b = ledger_bytes_per_step(path)
    print(
        f"\nbytes per step (SQLite pages with their primary-key index, {LEDGER_ROWS} ledger rows "
        f"a step): raw ledger {raw_b:,.0f}, rollups {roll_b:,.0f}"
    )
    print(f"rollup build: 1 x {big_steps:,} steps {big_build:.1f} s; ", end="")
    print(f"{n_runs} x {steps:,} steps {build:.1f} s")
    print(f"\n{'read (median ms of ' + str(repeat) + ')':<48}{'rollups':>10}{'naive scan':>12}")

    def row(label: str, fast: Any, slow: Any) -> None:
        f = median_ms([_timed(fast) for _ in range(repeat)])
        s = median_ms([_timed(slow) for _ in range(max(1, repeat // 2))])
        print(f"{label:<48}{f:>10.1f}{s:>12.1f}", flush=True)

    for label, runs, n in (
        (f"1 x {big_steps:,}", [big], big_steps),
        (f"{n_runs} x {steps:,}", ids, steps),
    ):
        whole = (0, n - 1)
        mid = (n // 4, 3 * n // 4)
        row(
            f"{label}: top 32 ids, whole run",
            lambda runs=runs, whole=whole: [read_token_ledger(db, r, *whole) for r in runs],
            lambda runs=runs, whole=whole: [naive_ledger(db, r, *whole, 32) for r in runs],
        )
        row(
            f"{label}: top 32 ids, middle half",
            lambda runs=runs, mid=mid: [read_token_ledger(db, r, *mid) for r in runs],
            lambda runs=runs, mid=mid: [naive_ledger(db, r, *mid, 32) for r in runs],
        )
        row(
            f"{label}: heatmap 100 buckets x 16 ids, whole run",
            lambda runs=runs, whole=whole: [
                read_token_ledger_buckets(db, r, *whole, 100) for r in runs
            ],
            lambda runs=runs, whole=whole: [naive_ledger(db, r, *whole, 16) for r in runs],
        )
        row(
            f"{label}: changes, 10% windows at 20% and 90%",
            lambda runs=runs, n=n: [
                token_changes(db, r, n // 5, 9 * n // 10, window=n // 10) for r in runs
            ],
            lambda runs=runs, n=n: [
                naive_ledger(db, r, n // 10, n // 5, 10**6)
                + naive_ledger(db, r, 8 * n // 10, 9 * n // 10, 10**6)
                for r in runs
            ],
        )
    print(
        "\nnaive scan: the GROUP BY over every raw ledger row of the range (the reads before "
        "the rollups;\nfor the heatmap, its top-16 query alone, before any per-bucket query)."
    )
    db.dispose()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sqlite", default=None, help="SQLite file (default: a temporary one)")
    ap.add_argument(
        "--pg",
        default=os.environ.get("KLMON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument(
        "--keep", action="store_true", help="keep the databases (reuse with --sqlite / --pg-db)"
    )
    ap.add_argument("--pg-db", default=None, help="an existing PostgreSQL database to (re)use")
    ap.add_argument("--many-runs", type=int, default=0, help="runs of the run-list bench")
    ap.add_argument("--many-steps", type=int, default=100_000, help="steps of each such run")
    ap.add_argument("--many-sqlite", default=None, help="SQLite file for it (kept, reused)")
    ap.add_argument("--metric-steps", type=int, default=0, help="steps of the metric bench")
    ap.add_argument("--metric-names", type=int, default=3, help="metrics of that run")
    ap.add_argument("--baseline", type=Path, default=None, help="klmon checkout to compare")
    ap.add_argument("--ledger", action="store_true", help="the token ledger reads")
    ap.add_argument("--ledger-runs", type=int, default=8)
    ap.add_argument("--ledger-steps", type=int, default=100_000)
    ap.add_argument("--ledger-big-steps", type=int, default=1_000_000)
    ap.add_argument(
        "--ledger-sqlite",
        default=str(Path(tempfile.gettempdir()) / "klmon-ledger-bench.db"),
        help="SQLite file for it (kept, reused)",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict[str, Any]] = []
    tmp = None
    if not args.no_sqlite:
        path = args.sqlite
        if path is None:
            tmp = tempfile.mkdtemp(prefix="klmon-bench-")
            path = str(Path(tmp) / "bench.db")
        results += bench_backend("sqlite", f"sqlite:///{path}", sizes, args.runs, args.repeat)
    if not args.no_pg:
        results += _bench_pg(args, sizes)
    many = None
    if args.many_runs:
        path = args.many_sqlite
        if path is None:
            tmp = tmp or tempfile.mkdtemp(prefix="klmon-bench-")
            path = str(Path(tmp) / "many.db")
        many = bench_many_runs(f"sqlite:///{path}", args.many_runs, args.many_steps, args.repeat)
    print()
    if results:
        print_table(results)
    if many:
        print_many(many)
    if args.metric_steps:
        run_metric_benches(args)
    if args.ledger:
        bench_ledger(
            args.ledger_sqlite,
            args.ledger_runs,
            args.ledger_steps,
            args.ledger_big_steps,
            args.repeat,
        )
    if tmp and not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _bench_pg(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    from sqlalchemy import text

    admin_url = args.pg
    base = admin_url.rpartition("/")[0]
    name = args.pg_db or f"klmon_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    created = False
    try:
        if not args.pg_db:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            created = True
    except Exception as exc:
        print(f"[postgresql] skipped: {str(exc).splitlines()[0]}")
        admin.dispose()
        return []
    try:
        print(f"[postgresql] database {name}" + (" (kept)" if args.keep else ""), flush=True)
        return bench_backend("postgresql", f"{base}/{name}", sizes, args.runs, args.repeat)
    finally:
        if created and not args.keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'backend':<11}{'steps/run':>10}{'runs':>5} | {'render ms':>9}{'kB':>7} | "
        f"{'zoom ms':>8}{'kB':>7} | {'live ms':>8}{'kB':>5} | {'naive ms':>9}{'naive MB':>9} | "
        f"{'rollups s':>9} | spike"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['backend']:<11}{r['steps_per_run']:>10,}{r['runs']:>5} | {r['render_ms']:>9.0f}"
            f"{r['render_bytes'] / 1e3:>7.0f} | {r['zoom_ms']:>8.0f}"
            f"{r['zoom_bytes'] / 1e3:>7.0f} | {r['live_ms']:>8.0f}{r['live_bytes'] / 1e3:>5.0f} | "
            f"{r['naive_ms']:>9.0f}{r['naive_bytes'] / 1e6:>9.1f} | {r['rollup_build_s']:>9.1f} | "
            f"{'yes' if r['spike_visible'] else 'NO'}"
        )
    print(
        "\nrender: page load, all charts of all runs with smoothing; zoom: the middle 1% of the "
        "run;\nlive: 10 new steps per run appended; naive: every step read, KL chart only, as "
        "JSON;\nrollups: one-time build for all runs of that size (stored, then kept up lazily)."
    )


def print_many(r: dict[str, Any]) -> None:
    print(
        f"\nSQLite, {r['runs']:,} runs x {r['steps_per_run']:,} steps (best of repeats, ms):\n"
        f"  run list, today's query (count every step, current KL run by run): {r['old_ms']:8.1f}\n"
        f"  run list from the counters (run_summaries, klmon runs):            "
        f"{r['summaries_ms']:8.1f}\n"
        f"  same as a DataFrame (list_runs):                                   "
        f"{r['list_runs_ms']:8.1f}\n"
        f"  Runs page data (DashboardData.runs_overview, uncached):            "
        f"{r['overview_ms']:8.1f}\n"
        f"  same, every run still running, stall input from the latest step rows (before): "
        f"{r['overview_running_old_ms']:8.1f} (median {r['overview_running_old_median_ms']:.1f})\n"
        f"  same, every run still running, from the wall times kept on runs (now):         "
        f"{r['overview_running_ms']:8.1f} (median {r['overview_running_median_ms']:.1f})\n"
        f"  (both gave the same statuses: {r['overview_running_statuses']})\n"
        f"whole processes (median ms): python -c pass {r['python_ms']:.0f} | raw SQL list "
        f"{r['raw_sql_ms']:.0f} | Database.open + run_summaries {r['sqlalchemy_ms']:.0f} | "
        f"klmon runs {r['klmon_runs_ms']:.0f}"
    )


if __name__ == "__main__":
    main()
