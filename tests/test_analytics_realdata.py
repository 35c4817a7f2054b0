"""Detectors on real training logs from public repositories (see /work/shared/realdata).

The logs are third-party data: they are read from the shared folder, never copied into the
project. A tiny reader maps their keys onto the step table; the real importer lives in
monitor/ingest. Each log shows one known problem, and only the detector for it fires.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from support.realdata_path import REALDATA

from monitor.analytics import DETECTORS, RunContext

pytestmark = pytest.mark.skipif(
    not REALDATA.is_dir(), reason=f"real training logs not found at {REALDATA}"
)
FINISHED = RunContext(status="finished")


def _table(rows: list[dict], renames: dict[str, str]) -> pd.DataFrame:
    df = pd.DataFrame(rows).rename(columns=renames).sort_values("step").reset_index(drop=True)
    return df.assign(wall_time=np.nan, status="ok")


def trainer_state(name: str) -> pd.DataFrame:
    """A TRL GRPOTrainer trainer_state.json: ``kl`` is the token-mean k3."""
    history = json.loads((REALDATA / name).read_text())["log_history"]
    rows = [r for r in history if "kl" in r]  # drops the train_runtime summary row
    return _table(rows, {"kl": "k3", "reward": "reward_mean", "completion_length": "resp_len_mean"})


def jsonl(name: str, kl_key: str) -> pd.DataFrame:
    """A PPO log, one JSON object per line, whose ``kl_key`` is a per-sequence KL."""
    lines = (REALDATA / name).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    extra = {"approx_kl": "trainer/approx_kl"} if kl_key != "approx_kl" else {}
    return _table(rows, {kl_key: "kl_mean", **extra})


def fired(df: pd.DataFrame) -> dict[str, list[int]]:
    found = {name: [f.step for f in d(df, FINISHED)] for name, d in DETECTORS.items()}
    return {name: steps for name, steps in found.items() if steps}


def test_gemma_grpo_isolated_kl_spike_at_step_130():
    df = trainer_state("gemma3_grpo_abdo.trainer_state.json")
    assert fired(df) == {"spike": [130]}
    [finding] = DETECTORS["spike"](df, FINISHED)
    assert finding.series == "k3" and "0.0687" in finding.message


def test_chaos_economy_completions_hit_the_length_cap():
    df = trainer_state("chaos_economy_grpo.trainer_state.json")
    found = DETECTORS["length_drift"](df, FINISHED)
    steps = [f.step for f in found]
    assert steps[0] == 100 and {115, 135, 200} <= set(steps)
    assert "hit the length cap (completions/clipped_ratio)" in found[0].message
    assert set(fired(df)) == {"length_drift"}


def test_trl_detox_reference_is_not_the_initial_policy():
    df = jsonl("ppo_detox_trl_baseline_zongyang.jsonl", "approx_kl")
    found = DETECTORS["reference_offset"](df, FINISHED)
    assert found[0].step == 2  # judged as soon as three rows exist, then for every step
    assert [f.step for f in found] == df["step"].tolist()[2:]
    assert "31.7 at step 0" in found[0].message
    assert set(fired(df)) == {"reference_offset"}


def test_manual_ppo_kl_is_persistently_negative():
    df = jsonl("ppo_detox_manual_zongyang.jsonl", "kl_vs_ref")
    found = DETECTORS["negative_kl"](df, FINISHED)
    assert found[0].step <= 10
    assert len(found) >= 190  # 199 of 200 steps are negative
    assert set(fired(df)) == {"negative_kl"}


def console(name: str) -> pd.DataFrame:
    """A TRL console log's printed dicts (string values); HF step = order of the dicts."""
    from support.realdata_alerts import console_rows

    rows = [{**r, "step": i} for i, r in enumerate(console_rows(REALDATA / name), start=1)]
    return _table(rows, {"kl": "k3", "reward": "reward_mean", "completion_length": "resp_len_mean"})


def test_console_log_kl_spike_at_hf_step_160():
    df = console("trl_grpo_console_adq_seed45_sunshine.log")
    assert len(df) == 200 and df["step"].iloc[-1] == 200
    found = DETECTORS["spike"](df, FINISHED)
    assert [f.step for f in found] == [135, 160]
    assert "0.92 nats/token at step 160" in found[1].message
    assert set(fired(df)) == {"spike"}
