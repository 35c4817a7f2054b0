"""Bounded work per step and truth under a failing disk: a huge step never stalls the writer,
a spool record is never larger than its reader takes, and when the spool cannot be written
(full or read-only disk) steps go straight to the database or are counted as dropped, and
flush()/finish() say so."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.db import migrated_sqlite

import monitor
from monitor.errors import InvalidInput
from monitor.ingest import spool as spool_mod
from monitor.ingest import writer as writer_mod
from monitor.ingest.spool import SpoolRecord, iter_records, spool_files
from monitor.store.database import Database
from monitor.store.runs import find_run_by_name
from monitor.store.steps import read_steps


def _batch(seed: int, b: int = 4, t: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(np.float32)
    return {"policy_logprobs": lp, "ref_logprobs": np.minimum(lp + 0.1, 0.0)}


def _stored(db_url: str, name: str) -> list[int]:
    db = Database.open(db_url)
    try:
        info = find_run_by_name(db, "sizes", name)
        return [] if info is None else read_steps(db, info.id)["step"].tolist()
    finally:
        db.dispose()


def test_a_step_above_the_limit_is_refused_at_the_call_before_any_copy(tmp_path) -> None:
    run = monitor.init("sizes", "limit", db=f"sqlite:///{tmp_path}/x.db", spool_dir=tmp_path)
    huge = np.broadcast_to(np.float32(-1.0), (2**13, 2**13 + 1))  # a view: no memory
    with pytest.raises(InvalidInput, match=rf"policy_logprobs has {2**13 * (2**13 + 1)} values"):
        run.log_step(0, policy_logprobs=huge, ref_logprobs=huge)
    with pytest.raises(InvalidInput, match=f"at most {writer_mod.STEP_VALUES_MAX}"):
        run.log_step(0, policy_logprobs=huge[:1], ref_logprobs=huge)
    # Wait for the writer (it creates the schema): Alembic is not thread-safe, and a
    # migration left running here would collide with the next test's own.
    run.finish(timeout=30)


def test_a_1024_by_32768_float32_step_does_not_stall_the_writer(sqlite_url: str, tmp_path) -> None:
    url = sqlite_url
    run = monitor.init("sizes", "huge", db=url, spool_dir=tmp_path / "spool", flush_interval=0.01)
    run.log_step(0, **_batch(0))  # the queue is not empty when the huge step comes
    rng = np.random.default_rng(0)
    lp = -rng.exponential(1.0, (1024, 32768)).astype(np.float32)
    run.log_step(1, policy_logprobs=lp, ref_logprobs=np.minimum(lp + 0.05, 0.0))
    del lp
    for step in range(2, 5):
        run.log_step(step, **_batch(step))
    assert run.flush(120), run.stats
    assert run.finish(timeout=30)
    assert _stored(url, "huge") == [0, 1, 2, 3, 4]
    for path in spool_files(tmp_path / "spool"):  # pragma: no cover - deleted when written
        pytest.fail(f"spool file left behind: {path}")


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 48), st.integers(1, 3000)), min_size=1, max_size=6),
    text_len=st.integers(0, 70_000),
)
def test_random_step_sizes_never_stall_the_writer_and_later_steps_arrive(
    tmp_path, monkeypatch, shapes, text_len
) -> None:
    # The limits shrunk so that small arrays take every path a huge step takes: queue full,
    # too big to spill raw (summarised on the caller's thread), a summary record with
    # samples over the reader's limit (kept without its samples).
    monkeypatch.setattr(spool_mod, "MAX_RECORD_BYTES", 64 * 1024)
    monkeypatch.setattr(writer_mod, "SPILL_MAX_BYTES", 16 * 1024)
    name = f"prop-{uuid.uuid4().hex[:8]}"
    url = migrated_sqlite(tmp_path / f"{name}.db")  # one database per example
    run = monitor.init(
        "sizes",
        name,
        db=url,
        spool_dir=tmp_path / name,
        queue_size=2,
        queue_bytes=32 * 1024,
        flush_interval=0.01,
    )
    for step, (b, t) in enumerate(shapes):
        run.log_step(step, **_batch(step, b, t), texts=(["x" * text_len] * b, ["y"] * b))
    last = len(shapes)
    run.log_step(last, **_batch(last))
    assert run.flush(60), run.stats
    assert run.finish(timeout=30)
    assert _stored(url, name) == list(range(last + 1))
    assert run.stats["corrupt"] == 0 and run.stats["dropped"] == 0


# --- the spool on a full or read-only disk -----------------------------------------------------


@contextlib.contextmanager
def _tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _spooled_steps(directory: Path) -> set[int]:
    out = set()
    for path in spool_files(directory):
        for r in iter_records(path):
            if isinstance(r, SpoolRecord) and r.record.get("type") in ("step", "raw"):
                out.add(int(r.record["step"]))
    return out


def test_full_spool_disk_with_the_database_up_loses_nothing(db_url: str, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="klmon")
    with _tmpfs(tmp_path / "full", "512k") as spool:
        # A queue too long to shed samples: the steps' records (~9 kB each, their samples
        # compressed) must fill the small disk.
        run = monitor.init(
            "sizes",
            "full-up",
            db=db_url,
            spool_dir=spool,
            flush_interval=0.01,
            queue_size=1000,
            queue_bytes=1 << 30,
        )
        for step in range(100):
            run.log_step(step, **_batch(step, 32, 512))
        assert run.flush(60), run.stats
        assert run.finish(timeout=30)
    assert _stored(db_url, "full-up") == list(range(100))
    assert run.stats["dropped"] == 0
    warned = [r.getMessage() for r in caplog.records if "cannot write the spool" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0], warned


def test_full_spool_disk_with_the_database_down_counts_every_drop(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="klmon")
    n = 300
    # Even a step shed of all its samples takes ~1.1 kB in the spool: 300 of them cannot fit
    # in 256 kB, however many samples the writer sheds while it catches up.
    with _tmpfs(tmp_path / "full", "256k") as spool:
        down = f"sqlite:///{tmp_path}/no/such/dir/x.db"
        run = monitor.init("sizes", "full-down", db=down, spool_dir=spool, flush_interval=0.01)
        for step in range(n):
            run.log_step(step, **_batch(step, 32, 512))
        assert not run.flush(1)
        assert not run.finish(timeout=1)
        kept = _spooled_steps(spool)
    dropped = run.stats["dropped"]
    assert dropped > 0
    assert len(kept) + dropped == n, (len(kept), dropped)  # each step kept or counted
    drops = [r.getMessage() for r in caplog.records if "dropped so far" in r.getMessage()]
    assert len(drops) == 1, drops
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 0


def test_a_spool_disk_that_fills_up_mid_run_and_is_freed(db_url: str, tmp_path) -> None:
    with _tmpfs(tmp_path / "fills", "2m") as spool:
        run = monitor.init("sizes", "fills", db=db_url, spool_dir=spool, flush_interval=0.01)
        for step in range(10):
            run.log_step(step, **_batch(step))
        assert run.flush(30)
        filler = spool / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        for step in range(10, 20):
            run.log_step(step, **_batch(step, 32, 512))
        assert run.flush(30), run.stats
        filler.unlink()
        for step in range(20, 30):
            run.log_step(step, **_batch(step))
        assert run.flush(30), run.stats
        assert run.stats["acknowledged"] >= 20  # the spool is used again once there is room
        assert run.finish(timeout=30)
    assert _stored(db_url, "fills") == list(range(30))
    assert run.stats["dropped"] == 0 and run.stats["corrupt"] == 0


def test_the_committer_skips_a_damaged_record_larger_than_its_window(tmp_path) -> None:
    """A record the reader refuses (damaged length) at the committer's place: it is skipped
    and counted, the reading goes on (it used to read the same bytes forever)."""
    from monitor.ingest.spool import FILE_MAGIC, RECORD_MAGIC, encode_record

    run = monitor.init("sizes", "window", db=f"sqlite:///{tmp_path}/no/x.db", spool_dir=tmp_path)
    writer = run._writer
    writer.cfg.max_batch_bytes = 64
    good = encode_record({"type": "metrics", "step": 1, "metrics": [["m", 1.0]], "t": 0.0})
    bogus = RECORD_MAGIC + (2**31).to_bytes(4, "little") + b"\0" * 200
    path = tmp_path / "damaged.bin"
    path.write_bytes(FILE_MAGIC + bogus + good)
    off, size = len(FILE_MAGIC), path.stat().st_size
    records, pos = writer._read_batch(path, off, size)
    assert pos > off and records == []
    assert run.stats["corrupt"] == 1
    records, pos = writer._read_batch(path, pos, size)
    assert [r["step"] for r in records] == [1] and pos == size
    run.finish(timeout=0.1)
