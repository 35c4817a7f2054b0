"""The TRL/transformers callback, driven through the documented TrainerCallback interface in
the order Trainer calls it (transformers itself is not installed here: too heavy for CI)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from monitor.integrations.trl import KlmonCallback
from monitor.store.database import Database
from monitor.store.runs import resolve_run
from monitor.store.steps import read_metrics


def test_callback_logs_trainer_scalars_and_finishes_the_run(db_url: str, tmp_path) -> None:
    args = SimpleNamespace(
        run_name="grpo-beta0.04",
        learning_rate=1e-6,
        beta=0.04,
        num_generations=8,
        process_index=0,
        world_size=1,
        output_dir="/tmp/out",
        report_to=["none"],
    )
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    control = SimpleNamespace(should_log=False)
    cb = KlmonCallback(project="trl", db=db_url, spool_dir=tmp_path / "spool")

    assert cb.on_init_end(args, state, control) is control
    cb.on_train_begin(args, state, control)
    for step in (10, 20):
        state.global_step = step
        cb.on_step_begin(args, state, control)
        cb.on_step_end(args, state, control)
        cb.on_log(
            args,
            state,
            control,
            logs={
                "kl": 0.001 * step,
                "reward": 0.5,
                "completion_length": 180.0,
                "grad_norm": float("nan"),
                "epoch": 0.1,
                "learning_rate": 1e-6,
                "not_a_number": "x",
                "flag": True,
            },
        )
    cb.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    cb.on_train_end(args, state, control)

    db = Database.open(db_url)
    run = resolve_run(db, "trl/grpo-beta0.04")
    assert run.status == "finished"
    assert run.config["beta"] == 0.04 and run.config["learning_rate"] == 1e-6
    metrics = read_metrics(db, run.id).set_index("step")
    assert metrics.loc[20, "kl"] == 0.02
    assert metrics.loc[10, "completion_length"] == 180.0
    assert metrics["grad_norm"].isna().all()  # NaN is stored as missing, not dropped silently
    assert "not_a_number" not in metrics.columns and "flag" not in metrics.columns
    db.dispose()


def test_only_the_main_process_logs(tmp_path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[int, dict]] = []

        def log_metrics(self, step, metrics) -> None:
            self.calls.append((step, metrics))

    recorder = Recorder()
    cb = KlmonCallback(run=recorder)  # a run the user created: not finished by the callback
    args = SimpleNamespace()
    cb.on_log(
        args, SimpleNamespace(global_step=3, is_world_process_zero=False), None, logs={"kl": 1}
    )
    cb.on_log(
        args, SimpleNamespace(global_step=4, is_world_process_zero=True), None, logs={"kl": 2}
    )
    cb.on_train_end(args, SimpleNamespace(), None)
    assert recorder.calls == [(4, {"kl": 2})]


def test_importing_klmon_imports_no_training_framework() -> None:
    code = (
        "import sys, monitor, monitor.divergence, monitor.integrations.trl; "
        "bad = [m for m in ('torch', 'trl', 'tensorflow', 'jax') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


GRPO_LOGS = {
    "kl": 0.012,
    "reward": 0.75,
    "reward_std": 0.2,
    "entropy": 1.5,
    "completions/mean_length": 120.0,
    "completions/clipped_ratio": 0.1,
    "rewards/accuracy/mean": 0.75,
    "loss": 0.01,
}


def test_callback_alone_fills_klmon_columns_through_the_key_table(db_url: str, tmp_path) -> None:
    """A callback-only run has a current KL, rewards and lengths (the importer's meanings)."""
    from monitor.ingest.importers.keys import detect_producer, lookup
    from monitor.store.steps import read_steps

    args = SimpleNamespace(run_name="grpo-cb", process_index=0, world_size=1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb = KlmonCallback(project="trl", db=db_url, spool_dir=tmp_path / "spool")
    cb.on_train_begin(args, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        cb.on_log(args, state, None, logs={**GRPO_LOGS, "kl": 0.01 * step})
    cb.on_train_end(args, state, None)
    db = Database.open(db_url)
    run = resolve_run(db, "trl/grpo-cb")
    steps = read_steps(db, run.id).set_index("step")
    producer = detect_producer(GRPO_LOGS)
    for key, value in GRPO_LOGS.items():
        meaning = lookup(producer, key)
        if key != "kl" and meaning is not None and meaning.quantity in steps.columns:
            assert steps.loc[3, meaning.quantity] == value, key
    assert steps["k3"].tolist() == [0.01, 0.02, 0.03]  # TRL GRPO's kl is a k3 token mean
    assert read_metrics(db, run.id).set_index("step").loc[2, "kl"] == 0.02
    db.dispose()


def test_watch_without_known_hooks_warns_once_and_keeps_the_scalars(
    db_url: str, tmp_path, caplog
) -> None:
    from monitor.integrations.trl import watch
    from monitor.store.steps import read_steps

    class SomeTrainer:  # a trainer of no known shape (DPO, SFT, a future TRL)
        def __init__(self) -> None:
            self.args = SimpleNamespace(run_name="dpo", beta=0.1, learning_rate=1e-6)
            self.state = SimpleNamespace(global_step=0, is_world_process_zero=True)
            self.callbacks: list = []

        def add_callback(self, cb) -> None:
            self.callbacks.append(cb)

    trainer = SomeTrainer()
    with caplog.at_level("WARNING", logger="klmon"):
        run = watch(trainer, project="trl", db=db_url, spool_dir=tmp_path / "sp")
    said = [r.getMessage() for r in caplog.records if "scalars only" in r.getMessage()]
    assert len(said) == 1 and "SomeTrainer" in said[0] and "TRL" in said[0]
    (cb,) = trainer.callbacks
    for step in (1, 2):
        trainer.state.global_step = step
        cb.on_log(trainer.args, trainer.state, None, logs=dict(GRPO_LOGS))
    cb.on_train_end(trainer.args, trainer.state, None)
    assert run.status == "finished" and run.config["kl_coef"] == 0.1
    db = Database.open(db_url)
    steps = read_steps(db, run.id).set_index("step")
    assert steps.loc[2, "reward_mean"] == 0.75
    db.dispose()


def test_watch_reads_an_rloo_trainers_kl_as_k1(db_url: str, tmp_path) -> None:
    """RLOO logs GRPO's key names, but its `kl` is the token mean of log p - log q (k1)."""
    from monitor.integrations.trl import watch
    from monitor.store.steps import read_steps

    class RLOOTrainer:  # the name is what watch goes by; no hooks of a known shape
        def __init__(self) -> None:
            self.args = SimpleNamespace(run_name="rloo", beta=0.05)
            self.state = SimpleNamespace(global_step=0, is_world_process_zero=True)
            self.callbacks: list = []

        def add_callback(self, cb) -> None:
            self.callbacks.append(cb)

    trainer = RLOOTrainer()
    run = watch(trainer, project="trl", db=db_url, spool_dir=tmp_path / "sp")
    (cb,) = trainer.callbacks
    for step in (1, 2):
        trainer.state.global_step = step
        cb.on_log(trainer.args, trainer.state, None, logs={**GRPO_LOGS, "kl": -0.01 * step})
    cb.on_train_end(trainer.args, trainer.state, None)
    db = Database.open(db_url)
    steps = read_steps(db, run.id).set_index("step")
    assert steps["k1"].tolist() == [-0.01, -0.02]
    assert steps["k3"].isna().all()
    db.dispose()
