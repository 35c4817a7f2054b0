"""veRL (0.9.x): log each step's batch once rewards and reference log-probs exist.

``watch(trainer, run)`` hooks the trainer where its batch is complete: the v1 trainer
(``trainer.use_v1``, the default) in ``_compute_advantage(batch, metrics)``, whose fields it
reads from the TransferQueue (``old_log_probs``, ``ref_log_prob``, ``response_mask``,
``rm_scores``, ``rollout_log_probs``, the sampled ids ``responses``); the legacy
``RayPPOTrainer.fit`` in
``_update_actor(batch)``, whose ``DataProto`` holds them with ``token_level_scores``. A step
made of several mini-batches (v1's ``_step_once`` per sample) becomes one klmon step
(``run.add_to_step``), closed at the trainer's ``on_step_end`` (v1) or after the update
(legacy). The step number is ``trainer.global_steps``, the one veRL logs. The response ids
(``responses``, aligned with the log-probs) fill the step's token ledger, named by the
trainer's ``tokenizer``.

``log_batch(run, step, batch)`` does one batch by hand (a ``DataProto``, a ``TensorDict``
or a mapping of tensors). veRL computes reference log-probs only when a KL term is on
(``actor_rollout_ref.actor.use_kl_loss`` or ``algorithm.use_kl_in_reward``); without them
it warns once and logs nothing per token. veRL itself is never imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from monitor.ingest.client import Run
from monitor.integrations._once import WarnOnce
from monitor.integrations._tokenizer import adopt_tokenizer

log = logging.getLogger("klmon.verl")

V1_FIELDS = [
    "response_mask",
    "old_log_probs",
    "ref_log_prob",
    "rm_scores",
    "rollout_log_probs",
    "responses",
]
_warn_once = WarnOnce(log)


def log_batch(run: Run, step: int, batch: Any) -> bool:
    """Add one veRL batch to ``step``; False (and a warning, once) without reference
    log-probs."""
    data = getattr(batch, "batch", batch)
    if hasattr(data, "to_padded_tensor"):  # a nested TensorDict from the TransferQueue
        data = data.to_padded_tensor()
    keys = set(data.keys())

    def get(name: str) -> Any:
        return data[name] if name in keys else None

    ref = get("ref_log_prob")
    if ref is None:
        _warn_once(
            "noref",
            "klmon: this veRL batch has no ref_log_prob (no KL term: use_kl_loss and "
            "use_kl_in_reward are off); nothing logged per token",
        )
        return False
    scores = get("token_level_scores")
    if scores is None:
        scores = get("rm_scores")
    run.add_to_step(
        int(step),
        policy_logprobs=get("old_log_probs"),
        ref_logprobs=ref,
        mask=get("response_mask"),
        rewards=None if scores is None else scores.sum(-1),
        rollout_logprobs=get("rollout_log_probs"),
        token_ids=get("responses"),
    )
    return True


def watch(trainer: Any, run: Run, *, kv_get: Callable[..., Any] | None = None) -> str:
    """Hook a veRL trainer; returns which trainer it found ("v1" or "legacy").
    ``kv_get``: the TransferQueue read (default ``transfer_queue.kv_batch_get``). The
    trainer's ``tokenizer`` becomes the run's vocabulary unless it has one."""
    adopt_tokenizer(run, trainer)
    if callable(getattr(trainer, "_compute_advantage", None)):
        _watch_v1(trainer, run, kv_get)
        return "v1"
    if callable(getattr(trainer, "_update_actor", None)):
        _watch_legacy(trainer, run)
        return "legacy"
    raise TypeError(
        f"{type(trainer).__name__} has neither _compute_advantage (veRL v1 trainer) nor "
        "_update_actor (RayPPOTrainer): call monitor.integrations.verl.log_batch yourself"
    )


def _watch_v1(trainer: Any, run: Run, kv_get: Callable[..., Any] | None) -> None:
    original, on_step_end = trainer._compute_advantage, trainer.on_step_end

    def compute_advantage(batch: Any, metrics: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            get = kv_get or _transfer_queue_get()
            data = get(keys=batch.keys, partition_id=batch.partition_id, select_fields=V1_FIELDS)
            log_batch(run, trainer.global_steps, data)
        except Exception as exc:  # never into training
            _warn_once(f"v1:{type(exc).__name__}", "klmon: veRL batch not logged: %s", exc)
        return original(batch, metrics, *args, **kwargs)

    def step_end(*args: Any, **kwargs: Any) -> Any:
        run.close_step()
        return on_step_end(*args, **kwargs)

    trainer._compute_advantage = compute_advantage
    trainer.on_step_end = step_end


def _watch_legacy(trainer: Any, run: Run) -> None:
    original = trainer._update_actor

    def update_actor(batch: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            log_batch(run, trainer.global_steps, batch)
            run.close_step()
        except Exception as exc:  # never into training
            _warn_once(f"legacy:{type(exc).__name__}", "klmon: veRL batch not logged: %s", exc)
        return original(batch, *args, **kwargs)

    trainer._update_actor = update_actor


def _transfer_queue_get() -> Callable[..., Any]:
    import transfer_queue as tq

    return tq.kv_batch_get
