"""Where a TRL trainer keeps klmon's inputs, found by feature and wrapped on the instance.

GRPO-style trainers (``GRPOTrainer`` and its relatives) compute the policy's per-token
log-probs in their loss, from inputs that carry the reference's (``ref_per_token_logps``,
when ``beta != 0``), the ``completion_mask`` and, with vLLM, ``sampling_per_token_logps``:
klmon records every micro-batch of an optimizer step from the loss (so its k3 is the one
TRL logs as ``kl``). RLOO-style trainers compute both log-probs once per generation and
keep only sums in their inputs: klmon records them at generation (TRL logs their token mean
of log p - log q as ``kl``, klmon's k1). Rewards, prompts, completions and token strings
come from the generation; a row id added to the generation's output follows each row
through TRL's shuffle and split into micro-batches.

Every wrapper returns what the trainer's method returned and never raises: a failure of
klmon is logged once, counted in ``hooks.failures`` and the step goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from monitor.ingest.client import Run
from monitor.integrations._once import WarnOnce
from monitor.integrations._tokenizer import tokenizer_of

log = logging.getLogger("klmon.trl")

ROW_KEY = "klmon_row"


def find_method(obj: Any, *fragments: str, prefer: str | None = None) -> str | None:
    """The name of a method of ``obj`` whose name contains every fragment (``prefer``: a
    fragment that wins a tie), or None."""
    names = [
        n
        for n in dir(type(obj))
        if all(f in n for f in fragments) and callable(getattr(type(obj), n, None))
    ]
    if not names:
        return None
    names.sort(key=lambda n: (prefer is None or prefer not in n, len(n)))
    return names[0]


class TRLHooks:
    """The wrappers installed on one trainer by :func:`monitor.integrations.trl.watch`."""

    def __init__(self, trainer: Any, run: Run) -> None:
        self.trainer = trainer
        self.run = run
        self.beta = float(getattr(trainer, "beta", getattr(trainer.args, "beta", 0.0)) or 0.0)
        self.failures = 0
        self.mode: str | None = None  # "loss" or "generation", known after a generation
        self.installed = False
        self._in_gen = False
        self._in_loss = False
        self._gen_logps: list[Any] = []
        self._loss_logps: Any = None
        self._rewards: Any = None
        self._rows: dict[str, Any] = {}
        self.warn_once = WarnOnce(log)
        self._beta0: dict[str, float] = {}
        self._beta0_step: int | None = None

    # -- installing --------------------------------------------------------------------------

    def install(self) -> bool:
        """Wrap the generation, loss, per-token log-prob and reward methods; False (and a
        warning naming the TRL version) when this trainer does not have them."""
        t = self.trainer
        gen = find_method(t, "generate_and_score")
        logps = find_method(t, "per_token_logps", prefer="entrop")
        rewards = find_method(t, "calculate_rewards") or find_method(t, "reward", "compute")
        if gen is None or logps is None or not hasattr(t, "compute_loss"):
            self.warn_once(
                "hooks",
                "klmon: %s (TRL %s) has no generation/log-prob methods klmon knows; logging "
                "its scalars only",
                type(t).__name__,
                _trl_version(),
            )
            return False
        self._wrap(gen, self._around_generation)
        self._wrap(logps, self._around_logps)
        self._wrap("compute_loss", self._around_loss)
        if rewards is not None:
            self._wrap(rewards, self._around_rewards)
        if self.beta == 0.0:
            self.warn_once(
                "beta0",
                "klmon: %s has beta=0: TRL computes no reference log-probs, so there is no KL "
                "to the reference to record; klmon logs policy NLL, entropy, rewards, lengths "
                "and the rollout gap (as metrics) and TRL's scalars",
                type(t).__name__,
            )
        self.installed = True
        return True

    def _wrap(self, name: str, around: Callable[..., Any]) -> None:
        original = getattr(self.trainer, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return around(original, *args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(self.trainer, name, wrapper)

    # -- the wrappers ------------------------------------------------------------------------

    def _around_generation(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._in_gen, self._gen_logps, self._rewards = True, [], None
        try:
            out = original(*args, **kwargs)
        finally:
            self._in_gen = False
        if self._training():
            self._guard(self._on_generated, args[0] if args else kwargs.get("inputs"), out)
        return out

    def _around_logps(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if self._in_loss and self._loss_logps is None:
            self._loss_logps = out
        elif self._in_gen:
            self._gen_logps.append(out)
        return out

    def _around_rewards(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if self._in_gen:
            self._rewards = out
        return out

    def _around_loss(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._training():
            return original(*args, **kwargs)
        self._in_loss, self._loss_logps = True, None
        try:
            out = original(*args, **kwargs)
        finally:
            self._in_loss = False
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        if self.mode == "loss" and isinstance(inputs, dict):
            self._guard(self._on_loss, inputs)
        return out

    # -- what is recorded --------------------------------------------------------------------

    def _on_generated(self, batch: Any, out: Any) -> None:
        if not isinstance(out, dict) or "completion_ids" not in out:
            return
        ids = out["completion_ids"]
        n = int(ids.shape[0])
        import torch

        out[ROW_KEY] = torch.arange(n, device=ids.device)
        tok = tokenizer_of(self.trainer)
        id_rows = ids.tolist()
        self._rows = {
            "prompts": _prompts(batch, n),
            "completions": tok.batch_decode(id_rows, skip_special_tokens=True) if tok else None,
            "tokens": [tok.convert_ids_to_tokens(r) for r in id_rows] if tok else None,
            "rewards": self._local_rewards(n),
        }
        if "ref_per_token_logps" in out or self.beta == 0.0:
            self.mode = "loss"
            return
        if len(self._gen_logps) >= 2:  # RLOO-style: policy, then reference, at generation
            self.mode = "generation"
            lp, ref = _first(self._gen_logps[0]), _first(self._gen_logps[-1])
            self._add(
                self._step(),
                lp,
                ref,
                out["completion_mask"],
                list(range(n)),
                rollout=out.get("sampling_per_token_logps"),
                token_ids=ids,
            )
            return
        self.warn_once(
            "noref",
            "klmon: %s (TRL %s) with beta=%s: no reference log-probs found in its generation; "
            "logging its scalars only",
            type(self.trainer).__name__,
            _trl_version(),
            self.beta,
        )

    def _on_loss(self, inputs: dict[str, Any]) -> None:
        if self._loss_logps is None:
            return
        lp = _first(self._loss_logps)
        entropies = self._loss_logps[1] if isinstance(self._loss_logps, tuple) else None
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        rows = inputs[ROW_KEY].tolist() if ROW_KEY in inputs else None
        ref = inputs.get("ref_per_token_logps")
        rollout = inputs.get("sampling_per_token_logps")
        step = self._step()
        if ref is None:
            self._beta0_add(step, lp, entropies, mask, rollout, rows)
            return
        ids = inputs.get("completion_ids")
        self._add(step, lp, ref, mask, rows, rollout=rollout, entropies=entropies, token_ids=ids)

    def _add(
        self,
        step: int,
        lp: Any,
        ref: Any,
        mask: Any,
        rows: list[int] | None,
        *,
        rollout: Any = None,
        entropies: Any = None,
        token_ids: Any = None,
    ) -> None:
        r = self._rows
        rewards = texts = tokens = None
        if rows is not None and r:
            if r.get("rewards") is not None:
                rewards = r["rewards"][rows]
            if r.get("completions") is not None:
                texts = ([r["prompts"][i] for i in rows], [r["completions"][i] for i in rows])
            if r.get("tokens") is not None:
                tokens = [r["tokens"][i] for i in rows]
        self.run.add_to_step(
            step,
            policy_logprobs=lp.detach(),
            ref_logprobs=ref.detach(),
            mask=mask.detach(),
            rewards=rewards,
            kl_coef=self.beta,
            texts=texts,
            tokens=tokens,
            rollout_logprobs=None if rollout is None else rollout.detach(),
            entropies=None if entropies is None else entropies.detach(),
            token_ids=None if token_ids is None else token_ids.detach(),
        )

    def _beta0_add(
        self, step: int, lp: Any, ent: Any, mask: Any, rollout: Any, rows: list[int] | None
    ) -> None:
        """beta == 0: sums for the metrics klmon can still give (no reference)."""
        if self._beta0_step is not None and step != self._beta0_step:
            self.close_step()
        self._beta0_step = step
        m = mask.detach().float()
        acc = self._beta0
        acc["tokens"] = acc.get("tokens", 0.0) + float(m.sum())
        acc["seqs"] = acc.get("seqs", 0.0) + float(m.shape[0])
        acc["nll"] = acc.get("nll", 0.0) - float((lp.detach() * m).sum())
        if ent is not None:
            acc["entropy"] = acc.get("entropy", 0.0) + float((ent.detach() * m).sum())
        if rollout is not None:
            gap = (rollout.detach() - lp.detach()) * m
            acc["gap"] = acc.get("gap", 0.0) + float(gap.nansum())
        r = self._rows.get("rewards") if self._rows else None
        if r is not None and rows is not None:
            acc["reward"] = acc.get("reward", 0.0) + float(np.sum(r[rows]))
            acc["rewarded"] = acc.get("rewarded", 0.0) + len(rows)

    def close_step(self) -> None:
        """End of an optimizer step: the step built from its micro-batches goes out."""
        self._guard(self._close)

    def _close(self) -> None:
        self.run.close_step()
        acc, step = self._beta0, self._beta0_step
        self._beta0, self._beta0_step = {}, None
        if step is None or not acc.get("tokens"):
            return
        n = acc["tokens"]
        metrics = {
            "klmon/policy_nll": acc["nll"] / n,
            "klmon/resp_len_mean": n / acc["seqs"],
        }
        if "entropy" in acc:
            metrics["klmon/entropy"] = acc["entropy"] / n
        if "gap" in acc:
            metrics["klmon/rollout_gap"] = acc["gap"] / n
        if acc.get("rewarded"):
            metrics["klmon/reward_mean"] = acc["reward"] / acc["rewarded"]
        self.run.log_metrics(step, metrics)

    # -- helpers -----------------------------------------------------------------------------

    def _step(self) -> int:
        # The optimizer step being built: TRL logs it as global_step once it is taken.
        return int(self.trainer.state.global_step) + 1

    def _training(self) -> bool:
        model = getattr(self.trainer, "model", None)
        return bool(getattr(model, "training", True))

    def _local_rewards(self, n: int) -> np.ndarray | None:
        """This process's total reward per completion (TRL gathers every process's)."""
        rpf = self._rewards
        if rpf is None:
            return None
        import torch

        weights = getattr(self.trainer, "reward_weights", None)
        if weights is not None:
            rpf = rpf * weights.to(rpf.device).unsqueeze(0)
        total = torch.nansum(rpf, dim=1).float().cpu().numpy()
        proc = int(getattr(getattr(self.trainer, "accelerator", None), "process_index", 0) or 0)
        total = total[proc * n : (proc + 1) * n] if total.shape[0] >= (proc + 1) * n else total
        if total.shape[0] != n or not np.isfinite(total).all():
            return None
        return total

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # never into the training loop
            self.failures += 1
            self.warn_once(
                f"fail:{type(exc).__name__}",
                "klmon: could not record a TRL step (%s: %s); training goes on (counted in "
                "hooks.failures)",
                type(exc).__name__,
                exc,
            )


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _prompts(batch: Any, n: int) -> list[str]:
    """Prompt texts of a generation batch (a list of dataset rows), one per completion."""
    if isinstance(batch, Sequence) and len(batch) == n:
        return [_prompt_text(x.get("prompt") if isinstance(x, dict) else x) for x in batch]
    return [""] * n


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # conversational: the messages' contents
        parts = (str(m.get("content", m)) if isinstance(m, dict) else str(m) for m in prompt)
        return "\n".join(parts)
    return "" if prompt is None else str(prompt)


def _trl_version() -> str:
    try:
        import trl

        return str(trl.__version__)
    except Exception:  # pragma: no cover - TRL absent
        return "not installed"


__all__ = ["ROW_KEY", "TRLHooks", "find_method"]
