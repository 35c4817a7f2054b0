"""Torch tensors in log_step: the caller copies raw bytes only (bfloat16 widened in the
background, device tensors copied asynchronously), and torch is never imported for numpy
callers. Runs where torch is installed (the `trl` venv); the import check runs everywhere."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import monitor
from monitor import divergence
from monitor.store.database import Database
from monitor.store.steps import read_steps


def _torch():
    """torch, or a skip; under KLMON_REQUIRE_TRL=1 (the CI's trl venv) a missing torch fails."""
    if os.environ.get("KLMON_REQUIRE_TRL") == "1":
        return importlib.import_module("torch")
    return pytest.importorskip("torch")


def test_logging_numpy_never_imports_torch(tmp_path) -> None:
    code = (
        "import sys, numpy as np, monitor\n"
        f"run = monitor.init('p', 'n', db='sqlite:///{tmp_path / 'x.db'}', "
        f"spool_dir={str(tmp_path / 'sp')!r})\n"
        "run.log_step(0, policy_logprobs=-np.ones((2, 3)), ref_logprobs=-np.ones((2, 3)))\n"
        "run.finish()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.trl
def test_cpu_tensors_of_every_float_dtype_are_stored_exactly(db_url: str, tmp_path) -> None:
    torch = _torch()
    from monitor.ingest.tensors import Deferred, host_copy

    rng = np.random.default_rng(0)
    lp = -rng.exponential(1.0, (8, 16)).astype(np.float32)
    ref = np.minimum(lp + rng.normal(0, 0.2, lp.shape).astype(np.float32), 0)
    mask = rng.random(lp.shape) < 0.8
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t_lp, t_ref = torch.from_numpy(lp).to(dtype), torch.from_numpy(ref).to(dtype)
        copy = host_copy(t_lp)
        assert isinstance(copy, Deferred) == (dtype == torch.bfloat16)
        want = divergence.summarize(t_lp.float().numpy(), t_ref.float().numpy(), mask).as_dict()
        name = str(dtype).rpartition(".")[2]
        with monitor.init(
            "proj", name, db=db_url, spool_dir=tmp_path / name, flush_interval=0.01
        ) as run:
            run.log_step(0, policy_logprobs=t_lp, ref_logprobs=t_ref, mask=torch.from_numpy(mask))
            t_lp.zero_()  # the trainer reuses its buffer at once: klmon has its own copy
            assert run.flush(20)
        db = Database.open(db_url)
        row = read_steps(db, run.id).iloc[0]
        db.dispose()
        for q in ("kl_mean", "k1", "k3", "n_tokens"):
            assert row[q] == pytest.approx(want[q], rel=1e-6), (name, q)


@pytest.mark.trl
def test_bad_bf16_values_are_rejected_in_the_background(db_url: str, tmp_path) -> None:
    torch = _torch()
    lp = torch.full((2, 4), -1.0, dtype=torch.bfloat16)
    lp[1, 2] = float("nan")
    with monitor.init("proj", "nan", db=db_url, spool_dir=tmp_path, flush_interval=0.01) as run:
        run.log_step(0, policy_logprobs=lp, ref_logprobs=torch.full((2, 4), -1.2))
        assert run.flush(20)
    assert run.stats["rejected"] == 1


@pytest.mark.trl
def test_the_device_copy_path_on_a_cpu_tensor() -> None:
    """The asynchronous copy (pinned buffer when CUDA exists, event when the source is on a
    CUDA device) run on a CPU tensor: the same bytes come back."""
    torch = _torch()
    from monitor.ingest.tensors import _device_copy

    src = torch.randn(4, 5).clamp(max=0)
    for t in (src, src.to(torch.bfloat16)):
        deferred = _device_copy(t, torch)
        assert deferred.shape == (4, 5)
        np.testing.assert_array_equal(deferred.resolve(), t.float().numpy())
