"""The spool format: round trips, checksums, damaged and truncated records, locks, segments."""

from __future__ import annotations

import os
import stat

import numpy as np

from monitor.ingest.spool import (
    FILE_MAGIC,
    CorruptRecord,
    FileLock,
    SpoolRecord,
    SpoolWriter,
    decode_body,
    encode_record,
    iter_records,
    spool_files,
)

HEADER = {"project": "proj", "name": "ppo/β 0.05", "rank": 0, "world_size": 1}


def _records(path):
    return list(iter_records(path))


def test_record_round_trip_keeps_arrays_exact() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) - 7.5
    rec = {"type": "step", "step": 3, "x": arr, "nested": [{"a": np.int64(5), "f": float("nan")}]}
    data = encode_record(rec)
    out = decode_body(data[12:])
    assert out["step"] == 3
    np.testing.assert_array_equal(out["x"], arr)
    assert out["x"].dtype == np.float32
    assert out["nested"] == [{"a": 5, "f": None}]


def test_bytes_travel_as_raw_blobs_next_to_arrays() -> None:
    """A sample's payload (bytes) is stored as it is after the JSON, like an array: no
    base64, no escaping, and it comes back as bytes."""
    payload = bytes(range(256)) * 3
    arr = np.arange(5, dtype=np.int64)
    rec = {"type": "step", "samples": [{"kind": "top", "payload": payload}], "hist": arr}
    data = encode_record(rec)
    assert data.endswith(payload + arr.tobytes())  # blobs in the order met
    assert len(data) < len(payload) + arr.nbytes + 200
    out = decode_body(data[12:])
    assert out["samples"] == [{"kind": "top", "payload": payload}]
    assert type(out["samples"][0]["payload"]) is bytes
    np.testing.assert_array_equal(out["hist"], arr)


def test_writer_files_are_private_locked_and_self_describing(tmp_path) -> None:
    w = SpoolWriter(tmp_path / "spool", HEADER)
    w.append({"type": "step", "step": 0})
    path = w.path
    assert path is not None and path.name.endswith(".klspool")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    lock = FileLock(path)
    assert not lock.acquire(), "the live writer holds the lock"
    recs = _records(path)
    assert [r.record["type"] for r in recs] == ["run", "step"]
    assert recs[0].record["name"] == "ppo/β 0.05"
    w.close(delete=False)
    assert lock.acquire(), "a closed (or dead) writer's file can be taken"
    lock.release()


def test_bad_checksum_is_reported_and_the_rest_is_read(tmp_path) -> None:
    w = SpoolWriter(tmp_path, HEADER)
    for step in range(5):
        w.append({"type": "step", "step": step, "blob": np.full(50, step, dtype=np.float64)})
    path = w.path
    w.close(delete=False)
    good = [r for r in _records(path) if isinstance(r, SpoolRecord)]
    victim = good[3]  # step 2
    data = bytearray(path.read_bytes())
    data[victim.offset + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    out = _records(path)
    bad = [r for r in out if isinstance(r, CorruptRecord)]
    steps = [r.record["step"] for r in out if isinstance(r, SpoolRecord) and "step" in r.record]
    assert steps == [0, 1, 3, 4]
    assert len(bad) == 1 and bad[0].reason == "checksum mismatch"
    assert bad[0].offset == victim.offset


def test_damaged_length_resyncs_on_the_next_record(tmp_path) -> None:
    w = SpoolWriter(tmp_path, HEADER)
    for step in range(4):
        w.append({"type": "step", "step": step})
    path = w.path
    w.close(delete=False)
    victim = [r for r in _records(path) if isinstance(r, SpoolRecord)][2]  # step 1
    data = bytearray(path.read_bytes())
    data[victim.offset + 4 : victim.offset + 8] = (10**6).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    out = _records(path)
    steps = [r.record["step"] for r in out if isinstance(r, SpoolRecord) and "step" in r.record]
    assert steps == [0, 2, 3]
    assert any(isinstance(r, CorruptRecord) for r in out)


def test_truncated_tail_is_reported(tmp_path) -> None:
    w = SpoolWriter(tmp_path, HEADER)
    for step in range(3):
        w.append({"type": "step", "step": step})
    path = w.path
    w.close(delete=False)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 5)
    out = _records(path)
    steps = [r.record["step"] for r in out if isinstance(r, SpoolRecord) and "step" in r.record]
    assert steps == [0, 1]
    assert isinstance(out[-1], CorruptRecord) and "truncated" in out[-1].reason


def test_not_a_spool_file(tmp_path) -> None:
    p = tmp_path / "x.klspool"
    p.write_bytes(b"hello world")
    out = _records(p)
    assert len(out) == 1 and "magic" in out[0].reason


def test_segments_roll_over_and_are_released(tmp_path) -> None:
    w = SpoolWriter(tmp_path, HEADER, max_segment_bytes=2000)
    for step in range(20):
        w.append({"type": "step", "step": step, "pad": "x" * 300})
    assert w.segment > 1
    files = spool_files(tmp_path)
    assert len(files) == w.segment
    size, final = w.segment_end(1)
    assert final and size == files[0].stat().st_size
    w.release(1)
    assert len(spool_files(tmp_path)) == w.segment - 1
    # every segment is self-contained: it starts with the run record
    for f in spool_files(tmp_path):
        first = next(iter(iter_records(f)))
        assert isinstance(first, SpoolRecord) and first.record["type"] == "run"
        assert f.read_bytes().startswith(FILE_MAGIC)
    w.close(delete=True)
    assert spool_files(tmp_path) == []
