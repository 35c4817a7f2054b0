"""The real training logs of ../shared/realdata through the default alert pack: how each one
is loaded into a database, and the alerts an RLHF engineer expects from it.

Shared by tests/test_alerts_realdata.py and benchmarks/bench_detection.py (its real-log
table). Each log is imported with `klmon import`; a TRL console log that this checkout's
importer does not read yet is loaded by the small parser below (the Trainer's printed
dicts, HF step = order of the dicts), so the check uses the importer as soon as it has one.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from monitor.alerts import AlertEngine, AlertSettings, load_rules
from monitor.cli import main
from monitor.store.alerts import list_events
from monitor.store.database import Database
from monitor.store.runs import get_or_create_run, resolve_run, set_run_status
from monitor.store.steps import write_metrics, write_steps
from support.realdata_path import REALDATA

T0 = 1_800_000_000.0


@dataclass(frozen=True)
class Case:
    """A log, the import options it needs, and the alerts expected: rule -> fired steps."""

    file: str
    expected: dict[str, list[int]]
    options: tuple[str, ...] = ()
    why: str = ""


CASES: Sequence[Case] = (
    Case(
        "gemma3_grpo_abdo.trainer_state.json",
        {"kl-spike": [130]},
        why="k3 0.0047 -> 0.0687 at step 130, back to 0.0095 next row",
    ),
    Case(
        "chaos_economy_grpo.trainer_state.json",
        {"length-drift": [120]},
        why="completions/clipped_ratio >= 0.95 from step 100 (1.0 from 115): truncated answers",
    ),
    Case(
        "trl_grpo_console_adq_seed45_sunshine.log",
        {"kl-spike": [135, 160]},
        why="k3 ~0.07: 0.41 at HF step 135, 0.92 at 160",
    ),
    Case(
        "trl_grpo_console_seed44_sunshine.log",
        {"kl-spike": [124]},
        why="k3 ~0.1: 0.335 at HF step 124 (0.22, 0.28 at 130, 132 in its cool-down)",
    ),
    Case(
        "ppo_detox_manual_zongyang.jsonl",
        {"negative-kl": [11]},
        options=("--map", "kl_vs_ref=kl_mean"),
        why="kl_vs_ref negative in 199 of 200 steps",
    ),
    Case(
        "ppo_detox_trl_baseline_zongyang.jsonl",
        {"reference-offset": [2]},
        options=("--map", "approx_kl=kl_mean"),
        why="31.7 nats/sequence at step 0: the reference is not the initial policy",
    ),
    Case(
        "trl_ppo_v1_kartikmunjal.trajectory.json",
        {"reference-offset": [3]},
        why="objective/kl 10.4 nats/sequence at step 1",
    ),
    Case(
        "trl_ppo_v2_kartikmunjal.trajectory.json",
        {"reference-offset": [3]},
        why="objective/kl 2.6 at step 1; its 4 isolated small negative values raise nothing",
    ),
    Case(
        "custom_ppo_dead_run_rlhfkit.train.jsonl",
        {},
        why="a run that never learned: KL +-1e-8 is noise, nothing to raise",
    ),
)

_DICT_LINE = re.compile(r"^\{'[^']+': .*\}$")


def console_rows(path: Path) -> list[dict[str, float]]:
    """The training-log dicts a TRL/HF Trainer printed (string or number values), in order;
    the ``train_runtime`` summary dict is left out. Step = 1-based order of the dicts."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not _DICT_LINE.match(line):
            continue
        try:
            d = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        if not isinstance(d, dict) or "train_runtime" in d:
            continue
        row = {}
        for k, v in d.items():
            try:
                row[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        rows.append(row)
    return rows


def _load_console(db: Database, path: Path, name: str) -> int:
    """Write a console log's dicts as a GRPO import would: ``kl`` is the token-mean k3."""
    run = get_or_create_run(db, "imported", name, source="import")
    renames = {"kl": "k3", "reward": "reward_mean", "reward_std": "reward_std"}
    steps, metrics = [], []
    for i, d in enumerate(console_rows(path), start=1):
        row = {"step": i, "wall_time": T0 + i}
        for key, value in d.items():
            if key in renames:
                row[renames[key]] = value
            else:
                metrics.append((i, key, value))
        if "completion_length" in d:
            row["resp_len_mean"] = d["completion_length"]
        steps.append(row)
    write_steps(db, run.id, steps)
    write_metrics(db, run.id, metrics)
    set_run_status(db, run.id, "finished")  # an import is a finished run
    return run.id


def load(db: Database, case: Case, name: str = "real") -> int:
    """Import ``case``'s log into ``db`` as run ``name``; returns the run id."""
    path = REALDATA / case.file
    result = CliRunner().invoke(
        main, ["import", str(path), "--run", name, "--quiet", "--db", db.url, *case.options]
    )
    if result.exit_code != 0:
        if not case.file.endswith(".log"):
            raise AssertionError(f"klmon import {case.file} failed: {result.output}")
        return _load_console(db, path, name)
    return resolve_run(db, name).id


def fired_alerts(db: Database, run_id: int) -> dict[str, list[int]]:
    """Evaluate the default pack once over the run; rule -> fired steps, in order."""
    engine = AlertEngine(
        db,
        load_rules(None),
        settings=AlertSettings(nodata_after=3600.0),
        clock=lambda: T0 + 10_000.0,
        senders={},
    )
    engine.evaluate([run_id])
    events = list_events(db, run_id=run_id, limit=None)
    events = events[events["fired_step"].notna()].sort_values("fired_step")
    out: dict[str, list[int]] = {}
    for rule, step in zip(events["rule"], events["fired_step"], strict=True):
        out.setdefault(str(rule), []).append(int(step))
    return out


def false_alerts(fired: dict[str, list[int]], expected: dict[str, list[int]]) -> int:
    """Alerts fired that the case does not expect (by rule and step)."""
    return sum(1 for rule, steps in fired.items() for s in steps if s not in expected.get(rule, []))
