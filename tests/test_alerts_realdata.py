"""The default rule pack through the engine on real logs (../shared/realdata, read in place):
each log raises exactly the alerts an RLHF engineer expects, by rule and step, and nothing
on the dead run or on the v2 PPO run's isolated small negative values. Generation metrics
logged on every 2nd or 4th row still raise length-drift: missing is not clear."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support.realdata_alerts import CASES, fired_alerts, load
from support.realdata_path import REALDATA

from monitor.cli import main
from monitor.store.runs import resolve_run

pytestmark = pytest.mark.skipif(
    not REALDATA.is_dir(), reason=f"real training logs not present at {REALDATA}"
)


@pytest.mark.parametrize("case", CASES, ids=[c.file.split(".")[0] for c in CASES])
def test_default_rules_raise_what_the_log_shows(db, case) -> None:
    fired = fired_alerts(db, load(db, case))
    assert fired == case.expected, f"{case.file} ({case.why})"


#: TRL GRPO's generation metrics (lengths, clipped ratio, rewards).
GENERATION_KEYS = ("completions/", "completion_length", "reward", "rewards/", "frac_reward")


@pytest.mark.parametrize("every", [2, 4])
def test_generation_metrics_on_every_nth_row_still_fire(db, tmp_path, every) -> None:
    """chaos_economy laid out as TRL logs a GRPO run with several optimisation rows per
    generation: generation metrics on every ``every``-th row only. The rows between carry
    no length or clipped ratio, so they neither hold nor clear length-drift, and the
    truncation (clipped_ratio >= 0.95 from step 100) still fires it."""
    state = json.loads((REALDATA / "chaos_economy_grpo.trainer_state.json").read_text())
    history = []
    for row in state["log_history"]:
        history.append(row)
        between = {k: v for k, v in row.items() if not k.startswith(GENERATION_KEYS)}
        history += [{**between, "step": row["step"] + j} for j in range(1, every)]
    state["log_history"] = history
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    result = CliRunner().invoke(
        main, ["import", str(path), "--run", "sparse", "--quiet", "--db", db.url]
    )
    assert result.exit_code == 0, result.output
    fired = fired_alerts(db, resolve_run(db, "sparse").id)
    # the same alert as on the dense log: five generation rows from step 100
    assert fired == {"length-drift": [120]}
