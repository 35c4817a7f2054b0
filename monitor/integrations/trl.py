"""TRL in one line: ``run = watch(trainer, project="rlhf")`` after building the trainer.

For ``GRPOTrainer`` and ``RLOOTrainer`` (and trainers built like them) :func:`watch` records
klmon's per-token quantities for every optimizer step, across all its micro-batches (see
``monitor.integrations.trl_hooks``), and every scalar TRL logs as a metric. For other
trainers (DPO, KTO, online DPO, SFT), and when the hooks are not found, the scalars whose
meaning klmon knows (``kl``, ``reward``, ``entropy``, ``completions/mean_length``, ...) also
fill klmon's step columns, through the same key table as ``klmon import``
(``monitor.ingest.importers.keys``), so a run without per-token data still has a current
KL, charts and alerts.

Importing klmon never imports transformers, TRL or torch; importing this module imports
``transformers`` only if it is installed (to subclass ``TrainerCallback``); without it the
class still follows the documented callback interface.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from monitor.ingest.client import Run, init
from monitor.ingest.importers.keys import detect_producer, lookup
from monitor.store.tables import METRIC_NAME_MAX, STEP_QUANTITIES

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
        #: True when klmon computes the step columns itself (per-token hooks): TRL's scalars
        #: are then metrics only, never a second value of the same column.
        self.per_token = False
        self.hooks: Any = None
        self._producer: str | None = None

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
        if not scalars:
            return control
        step = int(getattr(state, "global_step", 0))
        quantities = {} if self.per_token else self._quantities(scalars)
        if quantities:
            self.run.log_quantities(step, quantities, scalars)
        else:
            self.run.log_metrics(step, scalars)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.hooks is not None:
            self.hooks.close_step()
        return control

    def _quantities(self, scalars: Mapping[str, Any]) -> dict[str, float]:
        """klmon step columns from TRL's scalars, by the importer's key table."""
        if self._producer is None:
            self._producer = detect_producer(scalars)
        out: dict[str, float] = {}
        best: dict[str, int] = {}
        for key, value in scalars.items():
            meaning = lookup(self._producer, key)
            q = meaning.quantity if meaning is not None else None
            if q is None or q not in STEP_QUANTITIES:
                continue
            if q not in best or meaning.priority < best[q]:
                best[q] = meaning.priority
                out[q] = float(value)
        return out

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.hooks is not None:
            self.hooks.close_step()
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


def watch(
    trainer: Any,
    project: str = "trl",
    name: str | None = None,
    **init_kwargs: Any,
) -> Run:
    """Log a TRL trainer to klmon: call it once after building the trainer, before
    ``trainer.train()``. Returns the :class:`~monitor.ingest.client.Run` (finished when
    training ends). ``name`` defaults to ``args.run_name``; ``init_kwargs`` go to
    :func:`monitor.init` (``db=``, ``config=``, ``spool_dir=``...). Invalid steps are stored
    as rejected and counted (``on_invalid="log"``): klmon never raises into training.
    """
    from monitor.integrations._tokenizer import tokenizer_of
    from monitor.integrations.trl_hooks import TRLHooks

    args = trainer.args
    accelerator = getattr(trainer, "accelerator", None)
    config = {**_training_config(args), **dict(init_kwargs.pop("config", None) or {})}
    beta = getattr(trainer, "beta", getattr(args, "beta", None))
    if isinstance(beta, int | float):
        config.setdefault("kl_coef", float(beta))
    init_kwargs.setdefault("on_invalid", "log")
    init_kwargs.setdefault("tokenizer", tokenizer_of(trainer))  # names the ledger's ids
    run = init(
        project,
        name or getattr(args, "run_name", None) or type(trainer).__name__,
        config=config,
        rank=int(getattr(accelerator, "process_index", 0) or 0),
        world_size=int(getattr(accelerator, "num_processes", 1) or 1),
        **init_kwargs,
    )
    callback = KlmonCallback(project, run.name, run=run)
    callback._owns_run = True
    if "RLOO" in type(trainer).__name__:  # RLOO logs GRPO's keys, but its `kl` is k1
        callback._producer = "trl-rloo"
    hooks = TRLHooks(trainer, run)
    if hooks.install():
        callback.hooks = hooks
        callback.per_token = hooks.beta != 0.0
    trainer.add_callback(callback)
    return run
