"""A Hugging Face ``TrainerCallback`` for TRL trainers (PPO, GRPO, RLOO, DPO, ...).

It sends every scalar the trainer logs (``kl``, ``objective/kl``, ``reward``, ``loss``, ...)
to klmon as extra metrics under their own names, and records the run's status. Trainers do
not hand per-token log-probs to callbacks: to get klmon's own KL quantities, call
``callback.run.log_step(...)`` where your trainer has them (see the README, "TRL").

Importing klmon never imports transformers, TRL or torch; importing this module imports
``transformers`` only if it is installed (to subclass ``TrainerCallback``); without it the
class still follows the documented callback interface.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from monitor.ingest.client import Run, init
from monitor.store.models import METRIC_NAME_MAX

try:  # a real subclass when transformers is there, so Trainer's type checks pass
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - exercised when transformers is absent
    _CallbackBase = object

# Training arguments worth keeping in the run's config (small, comparable across runs).
CONFIG_KEYS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
    "beta",
    "kl_coef",
    "init_kl_coef",
    "target_kl",
    "target",
    "num_generations",
    "max_completion_length",
    "max_new_tokens",
    "temperature",
    "loss_type",
    "kl_estimator",
    "model_name_or_path",
)


class KlmonCallback(_CallbackBase):
    """Log a Trainer's scalars to klmon.

    ``KlmonCallback(project="rlhf", name="grpo-beta0.04")``; with ``name=None`` the run is
    named after ``args.run_name``. Pass ``run=`` to reuse a run you created with
    :func:`monitor.init` (then it is not finished by this callback).
    """

    def __init__(
        self,
        project: str = "trl",
        name: str | None = None,
        *,
        run: Run | None = None,
        db: str | None = None,
        config: Mapping[str, Any] | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.project = project
        self.name = name
        self.run = run
        self._owns_run = run is None
        self._db = db
        self._config = dict(config or {})
        self._init_kwargs = init_kwargs

    # -- the TrainerCallback interface (transformers.trainer_callback) ----------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.run is None:
            config = {**_training_config(args), **self._config}
            self.run = init(
                self.project,
                self.name or getattr(args, "run_name", None) or "trl-run",
                config=config,
                db=self._db,
                rank=int(getattr(args, "process_index", 0) or 0),
                world_size=int(getattr(args, "world_size", 1) or 1),
                **self._init_kwargs,
            )
        return control

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.run is None or not logs or not getattr(state, "is_world_process_zero", True):
            return control
        # NaN/inf are kept as "missing" at their step; strings and lists are not metrics.
        scalars = {k: v for k, v in logs.items() if _is_number(v) and 0 < len(k) <= METRIC_NAME_MAX}
        if scalars:
            self.run.log_metrics(int(getattr(state, "global_step", 0)), scalars)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.run is not None and self._owns_run:
            self.run.finish("finished")
        return control

    def __getattr__(self, name: str) -> Any:
        # Every other event of the interface (on_step_begin, on_evaluate, on_save, ...) is a
        # no-op that returns control, as TrainerCallback's own defaults do.
        if name.startswith("on_"):
            return lambda args, state, control, **kwargs: control
        raise AttributeError(name)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _training_config(args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        value = getattr(args, key, None)
        if isinstance(value, str | int | float | bool):
            out[key] = value
    return out
