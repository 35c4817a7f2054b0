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
