"""Throughput of ``monitor.divergence.summarize`` next to a plain-numpy baseline, same run.

Run: ``.venv/bin/python benchmarks/bench_divergence.py [--reps N] [--batch B] [--tokens T]``

A (B, T) float32 batch with a realistic response mask: half the rows left-padded, half
right-padded, response lengths uniform in [T/2, T] (about 75% fill), for four distributions
of the per-token l_t (``DISTRIBUTIONS``): healthy (Normal(0, 0.1): no token reaches the tail
at |l| >= 1/2), tiny-KL (Normal(0, 0.001): policy barely moved from the reference) and
heavy-tailed (0.15 * Student-t with 3 degrees of freedom), and drifted-rows (the first eighth
of the sequences drifted, l ~ Exponential(mean 0.5), the rest healthy: the top 1% lies in one
row range of the token pass, as in a run starting to drift). Prints, per distribution, the
median and best of ``--reps`` timed calls in tokens/s counting all B*T positions, the median CPU
time of a call (``time.process_time``: every thread of the process, the helper thread of the
token pass included, i.e. what a training process pays for it), and the peak extra memory
(tracemalloc) of one call relative to the input size (policy + ref + mask). The last block
times ``summarize`` on the batch of ``bench_ingest.py`` (``_batches``: prefix masks of 1/4 to
all of T, about 37% padding, rewards given), the step that ``log_step`` hands to the
background. Other processes on the machine make timings noisy: look at the median and the
best together, and run it more than once; ``--baseline DIR`` runs the same benchmark first on
the checkout at DIR (e.g. ``git archive <commit> monitor | tar -x -C DIR`` and
``python setup.py build_ext --inplace`` there), so that both lie in one run.

``summarize`` runs the compiled token pass (monitor/_kernel.c) with its AVX2 loop where the CPU
has one; the last two rows switch to its scalar loop and to the numpy kernel that installs
without a C compiler get, so all three are measured in the same run. The "token_ids" rows add
the token ledger (``token_ids=``: ids of a 151,646-token vocabulary, Zipf-like) counted by the
compiled scatter-add (``ledger`` in monitor/_kernel.c), by the numpy weighted bincount that
installs without a C compiler use, and by ``np.unique`` (ids past ``BINCOUNT_MAX_ID``), next
to the plain summary of the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the checkout whose monitor is measured: this one, or --baseline's (KLMON_BENCH_ROOT)
sys.path.insert(0, os.environ.get("KLMON_BENCH_ROOT", str(Path(__file__).resolve().parents[1])))

from monitor import divergence
from monitor.divergence import HIST_EDGES, LOGPROB_TOLERANCE, sequence_kl, summarize
from monitor.divergence import _compiled as compiled_pass
from monitor.divergence.ledger import BINCOUNT_MAX_ID

#: Per-token l_t of each benchmarked distribution, drawn from a generator for a (B, T) shape.
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "healthy": lambda rng, shape: 0.1 * rng.standard_normal(shape),
    "tiny-KL": lambda rng, shape: 0.001 * rng.standard_normal(shape),
    "heavy-tailed": lambda rng, shape: 0.15 * rng.standard_t(3, shape),
    "drifted-rows": lambda rng, shape: np.where(
        np.arange(shape[0])[:, None] < shape[0] // 8,
        rng.exponential(0.5, shape),
        0.1 * rng.standard_normal(shape),
    ),
}


def make_batch(
    b: int, t: int, dist: str = "heavy-tailed", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, b)
    cols = np.arange(t)[None, :]
    right = cols < lengths[:, None]
    left = cols >= (t - lengths)[:, None]
    mask = np.where((np.arange(b) % 2 == 0)[:, None], right, left)
    policy = -rng.gamma(0.5, 1.0, (b, t)).astype(np.float32)
    l_t = DISTRIBUTIONS[dist](rng, (b, t)).astype(np.float32)
    ref = np.minimum(policy - l_t, 0).astype(np.float32)
    policy[~mask] = 0.0
    ref[~mask] = 0.0
    return policy, ref, mask


def naive_summary(policy: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """The same quantities written the obvious way: whole-array numpy, float64 throughout."""
    p = policy.astype(np.float64)
    q = ref.astype(np.float64)
    pm, qm = p[mask], q[mask]
    if not (np.isfinite(pm).all() and np.isfinite(qm).all()):
        raise ValueError("non-finite log-prob")
    if (pm > LOGPROB_TOLERANCE).any() or (qm > LOGPROB_TOLERANCE).any():
        raise ValueError("positive log-prob")
    l_masked = np.where(mask, p - q, 0.0)
    seq = l_masked.sum(axis=1)
    lt = l_masked[mask]
    n = lt.size
    k = math.ceil(0.01 * n)
    top = np.partition(lt, n - k)[n - k :]
    pos = lt[lt > 0].sum()
    return {
        "kl_mean": seq.mean(),
        "kl_std": seq.std(),
        "quantiles": np.quantile(seq, [0.05, 0.5, 0.95, 0.99]),
        "k1": lt.mean(),
        "k2": 0.5 * np.mean(lt * lt),
        "k3": np.mean(np.expm1(-lt) + lt),
        "neg_kl_frac": np.mean(seq < 0),
        "top1pct_share": top[top > 0].sum() / pos if pos > 0 else 0.0,
        "policy_nll": -pm.mean(),
        "hist": np.histogram(np.clip(lt, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0],
    }


def switched(
    fn: Callable[[], Any], simd: bool = True, compiled: bool = True, ledger: bool = True
) -> Callable[[], Any]:
    """fn with the compiled kernel's AVX2 loop, its ledger pass or the compiled kernel itself
    switched off."""
    saved = compiled_pass.extension

    def run() -> Any:
        compiled_pass.SIMD = simd
        compiled_pass.LEDGER = ledger
        compiled_pass.extension = saved if compiled else None
        try:
            return fn()
        finally:
            compiled_pass.SIMD = True
            compiled_pass.LEDGER = True
            compiled_pass.extension = saved

    return run


def time_it(fn: Callable[[], Any], reps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (all threads) seconds of each of ``reps`` calls, after a warm-up call."""
    fn()  # warm-up: helper thread, page faults
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def peak_memory(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument(
        "--dist", action="append", choices=list(DISTRIBUTIONS), help="default: all of them"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a checkout (with its monitor/_kernel built in place) to run first, same options",
    )
    args = ap.parse_args()
    if args.baseline is not None:
        argv = [a for a in sys.argv[1:] if a != "--baseline" and a != str(args.baseline)]
        argv = [a for a in argv if not a.startswith("--baseline=")]
        print(f"=== baseline: {args.baseline.resolve()}", flush=True)
        env = {**os.environ, "KLMON_BENCH_ROOT": str(args.baseline.resolve())}
        subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        print(f"\n=== this checkout: {Path(divergence.__file__).parents[1]}", flush=True)
    print(
        f"batch ({args.batch}, {args.tokens}) float32, {args.reps} reps; "
        f"kernel: {divergence.kernel()} ({Path(divergence.__file__).parents[1]}); "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for dist in args.dist or list(DISTRIBUTIONS):
        bench_distribution(dist, args.batch, args.tokens, args.reps)
    bench_ingest_batch(args.batch, args.tokens, args.reps)


def bench_distribution(dist: str, b: int, t: int, reps: int) -> None:
    policy, ref, mask = make_batch(b, t, dist)
    positions = policy.size
    input_bytes = policy.nbytes + ref.nbytes + mask.nbytes
    padded = policy.copy()
    padded[~mask] = 1.0  # TRL fills padding with INVALID_LOGPROB = 1.0
    rng = np.random.default_rng(1)
    ids = np.minimum(rng.zipf(1.3, policy.shape) - 1, 151_645).astype(np.int64)
    huge = ids + BINCOUNT_MAX_ID  # past the bincount bound: counted with np.unique
    cases = {
        "naive numpy": lambda: naive_summary(policy, ref, mask),
        "summarize": lambda: summarize(policy, ref, mask),
        "+ token_ids, C scatter-add": lambda: summarize(policy, ref, mask, token_ids=ids),
        "+ token_ids, np.bincount": switched(
            lambda: summarize(policy, ref, mask, token_ids=ids), ledger=False
        ),
        "+ token_ids, np.unique": lambda: summarize(policy, ref, mask, token_ids=huge),
        "summarize, padding +1.0": lambda: summarize(padded, ref, mask),
        "sequence_kl only": lambda: sequence_kl(policy, ref, mask),
        "summarize, C scalar loop": switched(lambda: summarize(policy, ref, mask), simd=False),
        "summarize, numpy kernel": switched(lambda: summarize(policy, ref, mask), compiled=False),
    }
    print(
        f"\n{dist}: fill {mask.mean():.0%}, input {input_bytes / 2**20:.1f} MiB, "
        f"top1pct_share {summarize(policy, ref, mask).top1pct_share:.3f}"
    )
    print(f"{'':28s} {'median':>14s} {'best':>14s} {'cpu/call':>10s} {'peak extra mem':>16s}")
    for name, fn in cases.items():
        times, cpu = time_it(fn, reps)
        med, best = statistics.median(times), min(times)
        peak = peak_memory(fn)
        print(
            f"{name:28s} {positions / med / 1e6:8.0f} M/s {positions / best / 1e6:8.0f} M/s"
            f" {statistics.median(cpu) * 1e3:7.2f} ms"
            f" {peak / 2**20:8.1f} MiB {peak / input_bytes:4.2f}x"
        )


def bench_ingest_batch(b: int, t: int, reps: int) -> None:
    """summarize on bench_ingest.py's batches (four of them, in turn, as its loop does)."""
    from bench_ingest import _batches  # after monitor: it puts this checkout first on sys.path

    batches = _batches(4, b, t)
    fill = np.mean([m.mean() for _, _, m, _ in batches])
    calls = iter(range(1 << 60))

    def step() -> Any:
        lp, ref, mask, rewards = batches[next(calls) % len(batches)]
        return summarize(lp, ref, mask, rewards=rewards)

    times, cpu = time_it(step, 4 * reps)
    print(f"\nbench_ingest batch: fill {fill:.0%}, rewards given")
    print(f"{'':28s} {'median':>14s} {'best':>14s} {'cpu/call':>10s} {'wall/call':>10s}")
    print(
        f"{'summarize':28s} {b * t / statistics.median(times) / 1e6:8.0f} M/s"
        f" {b * t / min(times) / 1e6:8.0f} M/s {statistics.median(cpu) * 1e3:7.2f} ms"
        f" {statistics.median(times) * 1e3:7.2f} ms"
    )


if __name__ == "__main__":
    main()
