"""OpenRLHF (0.11.x): log each step's experiences, micro-batch by micro-batch.

An OpenRLHF step arrives as a list of ``Experience`` micro-batches of different widths
(``action_log_probs``, ``base_action_log_probs``, ``action_mask``: (B, A); ``kl``: (B, A)
with the configured estimator; ``info["reward"]``: (B,)). Each one is added to the same
klmon step (``run.add_to_step``), which is stored as if one call had carried them all.

OpenRLHF keeps ``base_action_log_probs`` only when the KL is a loss (``algo.kl.use_loss``);
otherwise it keeps the per-token ``kl``, from which the reference log-probs are recovered
when the estimator is ``k1`` (kl = log p - log q, exact while |kl| <= 10: OpenRLHF
clamps it there). With another estimator and no
reference log-probs klmon warns once and logs nothing per token. The action ids are the last
``A`` tokens of ``sequences`` (the actor's log-probs are of ``sequences[:, 1:]``, cut to the
last ``A``); they fill the step's token ledger, named by the trainer's ``tokenizer``.

``watch(trainer, run)`` wraps ``trainer.train_step(rollout_samples, global_step)`` and its
``experience_maker.make_experience_batch``: the experiences of the step are logged under
``global_step`` and the step is closed when ``train_step`` returns. OpenRLHF itself is never
imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from monitor.ingest.client import Run
from monitor.integrations._once import WarnOnce
from monitor.integrations._tokenizer import adopt_tokenizer

log = logging.getLogger("klmon.openrlhf")
_warn_once = WarnOnce(log)


def log_experiences(
    run: Run, step: int, experiences: Iterable[Any], *, kl_estimator: str | None = None
) -> int:
    """Add each experience of a step to ``step``; returns how many were logged."""
    n = 0
    for exp in experiences:
        lp = exp.action_log_probs
        ref = getattr(exp, "base_action_log_probs", None)
        kl = getattr(exp, "kl", None)
        if ref is None and kl is not None and kl_estimator == "k1":
            ref = lp - kl
        if ref is None:
            _warn_once(
                "noref",
                "klmon: OpenRLHF experiences carry no base_action_log_probs (algo.kl.use_loss "
                "is off) and their kl is not k1; nothing logged per token",
            )
            continue
        info = getattr(exp, "info", None) or {}
        seqs = getattr(exp, "sequences", None)
        width = lp.shape[-1]
        ids = seqs[:, -width:] if seqs is not None and seqs.shape[-1] >= width else None
        run.add_to_step(
            int(step),
            policy_logprobs=lp,
            ref_logprobs=ref,
            mask=exp.action_mask,
            rewards=info.get("reward"),
            rollout_logprobs=getattr(exp, "rollout_log_probs", None),
            token_ids=ids,
        )
        n += 1
    return n


def watch(trainer: Any, run: Run) -> None:
    """Hook an OpenRLHF PPO trainer (``train_step`` + ``experience_maker``); its
    ``tokenizer`` becomes the run's vocabulary unless it has one."""
    maker = trainer.experience_maker
    adopt_tokenizer(run, trainer, maker)
    make_batch, train_step = maker.make_experience_batch, trainer.train_step
    current: dict[str, int] = {}

    def make_experience_batch(*args: Any, **kwargs: Any) -> Any:
        experiences = make_batch(*args, **kwargs)
        try:
            estimator = _kl_estimator(trainer)
            log_experiences(run, current.get("step", 0), experiences, kl_estimator=estimator)
        except Exception as exc:  # never into training
            _warn_once(f"x:{type(exc).__name__}", "klmon: OpenRLHF step not logged: %s", exc)
        return experiences

    def step(rollout_samples: Any, global_step: int, *args: Any, **kwargs: Any) -> Any:
        current["step"] = int(global_step)
        try:
            return train_step(rollout_samples, global_step, *args, **kwargs)
        finally:
            run.close_step()

    maker.make_experience_batch = make_experience_batch
    trainer.train_step = step


def _kl_estimator(trainer: Any) -> str | None:
    args = getattr(getattr(trainer, "strategy", None), "args", None) or getattr(
        trainer, "args", None
    )
    try:
        return str(args.algo.kl.estimator)
    except AttributeError:
        return None
