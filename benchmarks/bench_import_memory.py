"""Peak memory and time of `klmon import` of a large, highly compressed Parquet file.

A Parquet file of N rows that compresses to almost nothing (the shape of the adversarial
20M-row file: constant columns, no step column) is imported into a fresh SQLite database in
a child process; the child's peak resident memory (ru_maxrss) and wall time are printed.
``--baseline DIR`` imports the same file with the klmon package found in DIR (for instance
an older checkout: ``git archive <commit> monitor | tar -x -C /tmp/old``) in the same run,
so the two figures are comparable.

    python benchmarks/bench_import_memory.py [--rows 1000000,3000000] [--baseline /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from monitor.ingest.importers import import_path
from monitor.store.database import Database
from monitor.store.engine import make_engine
from monitor.store.schema import upgrade
url, path = sys.argv[1], sys.argv[2]
engine = make_engine(url)
upgrade(engine)
engine.dispose()
db = Database.open(url)
t0 = time.perf_counter()
report = import_path(db, path, name="big")
wall = time.perf_counter() - t0
print(json.dumps({"steps": report.steps_inserted, "wall_s": wall,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_file(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunk = 1_000_000
    schema = pa.schema([("kl", pa.float64()), ("reward", pa.float64())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            writer.write_table(
                pa.table({"kl": pa.array([0.01] * n), "reward": pa.array([1.0] * n)})
            )


def run_child(package_root: Path, path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, url, str(path)],
            env=env,
            cwd=tmp,  # not the checkout: `python -c` puts the working directory first
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000,3000000", help="row counts, comma-separated")
    ap.add_argument("--baseline", type=Path, default=None, help="an older klmon checkout")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    versions = [("this checkout", here)]
    if args.baseline is not None:
        versions.insert(0, ("baseline", args.baseline))
    print(f"{'version':<14} {'rows':>10} {'file KiB':>9} {'peak MiB':>9} {'wall s':>8}  steps")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            path = Path(tmp) / f"rows{rows}.parquet"
            make_file(path, rows)
            size = path.stat().st_size / 1024
            for label, root in versions:
                r = run_child(root, path)
                if "error" in r:
                    print(f"{label:<14} {rows:>10} {size:>9.0f}  failed: {r['error']}")
                    continue
                print(
                    f"{label:<14} {rows:>10} {size:>9.0f} {r['peak_mib']:>9.0f} "
                    f"{r['wall_s']:>8.1f}  {r['steps']}"
                )


if __name__ == "__main__":
    main()
