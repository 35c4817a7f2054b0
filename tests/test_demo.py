"""The demo: its runs, samples and histograms, a clean rebuild, the alerts it shows, the
served dashboard and the live run."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from monitor.cli import main
from monitor.demo import DEMO_PROJECT, DashboardServer, LiveRun, build_demo, demo_runs
from monitor.store.database import Database
from monitor.store.drilldown import list_annotations, read_histograms, read_samples
from monitor.store.runs import get_or_create_run, list_runs
from monitor.store.vocabulary import read_token_ledger

STEPS = 60  # the smallest history the demo accepts: quick, and still every scenario


@pytest.fixture(autouse=True)
def _no_smtp(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KLMON_SMTP_HOST", "KLMON_MAIL_FILE", "KLMON_WEBHOOK_URL", "KLMON_ALERT_RULES"):
        monkeypatch.delenv(name, raising=False)


def _demo_runs(db: Database):
    runs = list_runs(db)
    return runs[runs["project"] == DEMO_PROJECT].set_index("name")


def test_build_demo_makes_every_run_with_samples_and_histograms(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    summary = build_demo(url, steps=STEPS)
    db = Database.open(url)
    runs = _demo_runs(db)
    specs = demo_runs(STEPS)
    assert sorted(runs.index) == sorted(s.name for s in specs)
    assert summary.steps == sum(s.steps for s in specs) == int(runs["n_steps"].sum())
    statuses = runs["status"].to_dict()
    assert statuses.pop("ppo-live") == "running"
    assert set(statuses.values()) == {"finished"}
    # the reference mismatch ends with negative KL; the others do not
    assert runs.loc["ppo-ref-mismatch", "last_kl"] < 0 < runs.loc["ppo-healthy", "last_kl"]

    rid = int(runs.loc["ppo-kl-spike", "id"])
    samples = read_samples(db, rid, STEPS - 1)
    assert (
        samples and samples[0].tokens and len(samples[0].tokens) == len(samples[0].policy_logprobs)
    )
    assert samples[0].prompt and samples[0].response
    steps, counts = read_histograms(db, rid)
    assert len(steps) == STEPS and counts.sum() > 0
    notes = list_annotations(db, rid)
    assert len(notes) == 1 and "data loader" in notes[0].text
    # every run has a token ledger with the vocabulary's texts; the hack's is 'help' and '!!'
    for name in runs.index:
        top = read_token_ledger(db, int(runs.loc[name, "id"]), k=3)
        assert not top.empty and top["token"].notna().all(), name
    hack = read_token_ledger(db, int(runs.loc["ppo-reward-hacking", "id"]), STEPS // 2 + 20, k=2)
    assert sorted(hack["token"]) == ["!!", "help"] and hack["share_pos"].sum() > 0.8
    db.dispose()


def test_rebuild_replaces_the_demo_and_keeps_other_projects(db_url: str) -> None:
    build_demo(db_url, steps=STEPS)
    db = Database.open(db_url)
    get_or_create_run(db, "mine", "keep-me")
    build_demo(db_url, steps=STEPS)
    runs = list_runs(db)
    assert runs["name"].tolist().count("ppo-healthy") == 1
    assert len(_demo_runs(db)) == len(demo_runs(STEPS))
    assert "keep-me" in runs["name"].tolist()
    with db.begin() as conn:  # nothing of the old demo runs is left behind
        orphans = conn.execute(
            text("SELECT COUNT(*) FROM samples WHERE run_id NOT IN (SELECT id FROM runs)")
        ).scalar()
    assert orphans == 0
    db.dispose()


def test_rebuild_of_a_demo_only_file_starts_afresh(tmp_path) -> None:
    path = tmp_path / "klmon-demo.db"
    url = f"sqlite:///{path}"
    build_demo(url, steps=STEPS)
    first = {n: i for n, i in build_demo(url, steps=STEPS).run_ids.items()}
    assert first["ppo-healthy"] == 1  # a new file: ids start again
    db = Database.open(url)
    assert len(list_runs(db)) == len(demo_runs(STEPS))
    db.dispose()


def test_demo_no_serve_prints_the_alerts_and_writes_the_mail(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo", "--no-serve", "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sqlite:///./klmon-demo.db" in out
    for spec in demo_runs(STEPS):
        assert spec.name in out
    assert "negative-kl" in out and "FIRING" in out
    assert "klmon-demo.mbox" in out
    mbox = (tmp_path / "klmon-demo.mbox").read_text(errors="replace")
    assert "Subject:" in mbox and "ppo-ref-mismatch" in mbox
    assert "Drift vocabulary at step" in mbox  # the emails name the tokens

    runs = CliRunner().invoke(main, ["runs", "--json", "--db", "sqlite:///klmon-demo.db"])
    assert len(json.loads(runs.output)) == len(demo_runs(STEPS))


def test_demo_on_a_database_that_is_down_says_so_in_one_line_without_the_password() -> None:
    result = CliRunner().invoke(
        main, ["demo", "--no-serve", "--db", "postgresql://u:s3cret@127.0.0.1:1/x"]
    )
    assert result.exit_code == 1
    assert "s3cret" not in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert "Error: database postgresql+psycopg://u:***@127.0.0.1:1/x is unavailable" in (
        result.output
    )


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


def test_served_dashboard_and_live_run(tmp_path) -> None:
    pytest.importorskip("monitor.dashboard", reason="the dashboard package is not in this tree")
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    summary = build_demo(url, steps=STEPS)
    server = DashboardServer(url, "127.0.0.1", 0).start()
    try:
        assert _get(f"{server.url}/healthz") == (200, "ok\n")
        status, page = _get(f"{server.url}/")
        assert status == 200 and "klmon" in page
        live = LiveRun(url, steps=STEPS, interval=0.02, alert_interval=0.2).start()
        deadline = time.monotonic() + 20
        while live.logged < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        live.stop()
        assert live.logged >= 10 and not live.errors
    finally:
        server.stop()
    db = Database.open(url)
    runs = _demo_runs(db)
    assert runs.loc["ppo-live", "status"] == "finished"
    assert runs.loc["ppo-live", "n_steps"] == summary.live_next_step + live.logged
    db.dispose()
