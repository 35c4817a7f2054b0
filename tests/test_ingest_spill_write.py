"""A step spilled on the training loop's thread is written without releasing the GIL
(``writev_holding_gil`` in ``monitor/_kernel.c``), with ``os.writev`` where that is not built:
both write the same bytes, and a record so written reads back whole."""

from __future__ import annotations

import os

import numpy as np
import pytest

from monitor.ingest import spool
from monitor.ingest.spool import SpoolRecord, SpoolWriter, iter_records

needs_c = pytest.mark.skipif(spool._writev_holding_gil is None, reason="extension not built")


@pytest.fixture(params=["holding", "os.writev"])
def writev(request, monkeypatch) -> str:
    if request.param == "holding" and spool._writev_holding_gil is None:
        pytest.skip("extension not built")
    if request.param == "os.writev":
        monkeypatch.setattr(spool, "_writev_holding_gil", None)
    return request.param


@pytest.mark.parametrize("n_parts", [1, 3, 200])  # 200: more than one writev takes
def test_the_parts_are_written_in_order(tmp_path, writev, n_parts) -> None:
    rng = np.random.default_rng(n_parts)
    parts = [memoryview(rng.bytes(int(rng.integers(0, 5000)))) for _ in range(n_parts)]
    parts[0] = b"head"
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        assert spool._write_parts(fd, parts, hold_gil=True) == sum(len(p) for p in parts)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


def test_a_record_appended_holding_the_gil_reads_back(tmp_path, writev) -> None:
    w = SpoolWriter(tmp_path, {"project": "p", "name": "n"})
    lp = np.linspace(-3, 0, 4096, dtype=np.float32).reshape(2, -1)
    w.append({"type": "raw", "step": 7, "lp": lp}, may_fsync=False, hold_gil=True)
    path = w.path
    w.close(delete=False)
    records = [r.record for r in iter_records(path) if isinstance(r, SpoolRecord)]
    assert records[-1]["step"] == 7
    np.testing.assert_array_equal(records[-1]["lp"], lp)


@needs_c
def test_a_failed_write_raises_oserror() -> None:
    with pytest.raises(OSError):
        spool._writev_holding_gil(-1, [b"x"])
