"""Detection quality of monitor.analytics on simulated runs, with the default parameters.

Prints, per failure kind and view, the detection delay (steps from the onset until the
detector named after the kind first fires; the finding is re-checked on the table cut at
that step, so the delay is what a live engine would see), and the false alerts per 1,000
steps of every detector on healthy runs of ``--steps`` steps (several seeds, each view).

Views: ``sequence`` (PPO-like, kl_mean ~14 nats), ``token`` (kl_mean ~0.8 nats, k3 ~0.02
per token) and ``grpo`` (the token run as a GRPO import: k3 only).
Target: every kind within 25 steps of onset, 0 alerts on healthy runs.

Then the real-log table: each log of ../shared/realdata (see tests/support/realdata_alerts.py)
imported into a fresh SQLite database and evaluated by the alert engine with the default
pack; the alerts fired (rule@step), those expected, and the false alerts (fired, not
expected).

    python benchmarks/bench_detection.py [--seeds 3] [--healthy-seeds 4] [--steps 2000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from monitor.analytics import DETECTORS
from monitor.simulate import SCENARIOS, SimulatedRun, grpo_view, simulate_run

VIEWS = ("sequence", "token", "grpo")
TARGET_DELAY = 25
#: Kinds a view cannot show: GRPO logs only k3 (>= 0 by construction) and no token shares.
UNOBSERVABLE = {
    ("grpo", "negative_kl"): "k3 >= 0",
    ("grpo", "concentration"): "no top1pct_share",
}


def make_run(kind: str, view: str, seed: int, steps: int, onset: int | None) -> SimulatedRun:
    scale = "sequence" if view == "sequence" else "token"
    run = simulate_run(kind, steps=steps, seed=seed, onset=onset, scale=scale)
    return grpo_view(run) if view == "grpo" else run


def detection_delay(run: SimulatedRun) -> float | None:
    """Steps from onset to the first finding of the kind's detector (None: never)."""
    detector = DETECTORS[run.kind]
    if run.kind == "stalled":
        return _stall_delay(run)
    df = run.steps_df
    steps = [f.step for f in detector(df, run.context()) if f.step >= run.onset]
    if not steps:
        return None
    first = steps[0]
    cut = df[df["step"] <= first]
    assert first in {f.step for f in detector(cut, run.context())}, "finding not causal"
    return float(first - run.onset)


def _stall_delay(run: SimulatedRun) -> float | None:
    """Silence (in median step intervals) after which ``stalled`` first fires."""
    interval = run.step_seconds
    for k in range(1, 200):
        now = run.last_seen_at + k * interval / 4
        if DETECTORS["stalled"](run.steps_df, run.context(now=now)):
            return k / 4
    return None


def scenario_job(args: tuple[str, str, int, int, int]) -> tuple[str, str, float | None]:
    kind, view, seed, steps, onset = args
    return kind, view, detection_delay(make_run(kind, view, seed, steps, onset))


def healthy_job(args: tuple[str, int, int]) -> tuple[str, Counter, int, float]:
    view, seed, steps = args
    run = make_run("healthy", view, seed, steps, None)
    counts: Counter = Counter()
    started = time.perf_counter()
    for name, detector in DETECTORS.items():
        counts[name] += len(detector(run.steps_df, run.context()))
    return view, counts, len(run.steps_df), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per kind and view")
    parser.add_argument("--healthy-seeds", type=int, default=4, help="healthy runs per view")
    parser.add_argument("--steps", type=int, default=2000, help="steps of a healthy run")
    parser.add_argument("--onset", type=int, default=500, help="onset step of a failure")
    parser.add_argument("--after", type=int, default=150, help="steps simulated after onset")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()

    kinds = [k for k in SCENARIOS if k != "healthy"]
    jobs = [
        (kind, view, seed, args.onset + args.after, args.onset)
        for kind in kinds
        for view in VIEWS
        for seed in range(args.seeds)
        if (view, kind) not in UNOBSERVABLE
    ]
    healthy = [(view, seed, args.steps) for view in VIEWS for seed in range(args.healthy_seeds)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        delays: dict[tuple[str, str], list[float | None]] = {}
        for kind, view, delay in pool.map(scenario_job, jobs):
            delays.setdefault((kind, view), []).append(delay)
        healthy_results = list(pool.map(healthy_job, healthy))
    elapsed = time.perf_counter() - started

    print(f"Detection delay in steps after onset (onset {args.onset}, {args.seeds} seeds;")
    print("stalled: in median step intervals of silence); '-' = missed; target <=", TARGET_DELAY)
    print(f"{'kind':<18}" + "".join(f"{v:>26}" for v in VIEWS))
    worst = 0.0
    missed = 0
    for kind in kinds:
        cells = []
        for view in VIEWS:
            if (view, kind) in UNOBSERVABLE:
                cells.append(f"n/a ({UNOBSERVABLE[view, kind]})")
                continue
            found = delays[kind, view]
            missed += sum(d is None for d in found)
            worst = max([worst, *(d for d in found if d is not None)])
            cells.append(" ".join("-" if d is None else f"{d:.3g}" for d in found))
        print(f"{kind:<18}" + "".join(f"{c:>26}" for c in cells))

    print(
        f"\nFalse alerts per 1,000 healthy steps ({args.healthy_seeds} runs x {args.steps} "
        "steps per view; a finding = one alerting step)"
    )
    totals = {view: Counter() for view in VIEWS}
    rows = dict.fromkeys(VIEWS, 0)
    seconds = []
    for view, counts, n, took in healthy_results:
        totals[view].update(counts)
        rows[view] += n
        seconds.append(took)
    print(f"{'detector':<18}" + "".join(f"{v:>12}" for v in VIEWS))
    false_total = 0
    for name in DETECTORS:
        per_k = [1000 * totals[v][name] / rows[v] for v in VIEWS]
        false_total += sum(totals[v][name] for v in VIEWS)
        print(f"{name:<18}" + "".join(f"{x:>12.2f}" for x in per_k))
    print(
        f"\nworst delay {worst:g} steps, {missed} missed, {false_total} false alerts in "
        f"{sum(rows.values())} healthy steps; all detectors on one {args.steps}-step table: "
        f"{np.median(seconds):.2f} s (median); total {elapsed:.0f} s"
    )


def real_log_table() -> None:
    """Print the default pack's alerts on each real log next to the expected ones."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.realdata_alerts import CASES, false_alerts, fired_alerts, load
    from support.realdata_path import REALDATA

    from monitor.store.database import Database
    from monitor.store.schema import upgrade

    if not REALDATA.is_dir():
        print(f"\nreal logs not found at {REALDATA}: no real-log table")
        return
    logging.getLogger("monitor.alerts").setLevel(logging.ERROR)  # the table says what fired

    def cell(alerts: dict[str, list[int]]) -> str:
        return ", ".join(f"{r}@{s}" for r, steps in alerts.items() for s in steps) or "none"

    print("\nReal logs through the alert engine with the default pack")
    print(f"{'file':<44}{'fired (rule@step)':<34}{'expected':<34}{'false':>5}")
    total_false = missed = 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            db = Database.open(f"sqlite:///{tmp}/real.db", check=False)
            upgrade(db.engine)
            fired = fired_alerts(db, load(db, case))
            db.dispose()
        wrong = false_alerts(fired, case.expected)
        total_false += wrong
        missed += false_alerts(case.expected, fired)
        print(f"{case.file:<44}{cell(fired):<34}{cell(case.expected):<34}{wrong:>5}")
    print(f"{total_false} false alerts, {missed} expected alerts missed, {len(CASES)} logs")


if __name__ == "__main__":
    main()
    real_log_table()
