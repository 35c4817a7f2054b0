"""The default rule pack through the engine on real logs imported with `klmon import`: each
known problem is raised by the rule that explains it. Reads ../shared/realdata in place."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from realdata_path import REALDATA
from test_alerts_support import Clock, ListSender

from monitor.alerts import AlertEngine, AlertSettings, load_rules
from monitor.cli import main
from monitor.store.alerts import list_events
from monitor.store.runs import resolve_run

pytestmark = pytest.mark.skipif(
    not REALDATA.is_dir(), reason=f"real training logs not present at {REALDATA}"
)

CASES = [
    ("chaos_economy_grpo.trainer_state.json", [], "length-drift"),
    ("gemma3_grpo_abdo.trainer_state.json", [], "kl-spike"),
    ("ppo_detox_manual_zongyang.jsonl", ["--map", "kl_vs_ref=kl_mean"], "negative-kl"),
    ("ppo_detox_trl_baseline_zongyang.jsonl", ["--map", "approx_kl=kl_mean"], "reference-offset"),
]


@pytest.mark.parametrize(("filename", "options", "rule"), CASES, ids=[c[2] for c in CASES])
def test_default_rules_flag_the_real_problem(db, filename, options, rule) -> None:
    result = CliRunner().invoke(
        main,
        ["import", str(REALDATA / filename), "--run", "real", "--quiet", "--db", db.url, *options],
    )
    assert result.exit_code == 0, result.output
    run = resolve_run(db, "real")
    engine = AlertEngine(
        db,
        load_rules(None),
        settings=AlertSettings(nodata_after=3600.0),
        clock=Clock(),
        senders={"email": ListSender()},
    )
    engine.run_once()
    events = list_events(db, run_id=run.id)
    fired = set(events.loc[events["fired_step"].notna(), "rule"])
    assert rule in fired, f"{rule} did not fire on {filename}; fired: {sorted(fired)}"
