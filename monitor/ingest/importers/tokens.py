"""Per-token JSON Lines: one sequence per line with its policy and reference log-probs.

klmon computes its own full summaries from these, as the live client would: lines are
grouped by step, each step goes through :func:`monitor.divergence.summarize`, and the step
row, the token histogram and a few samples (the highest-KL sequences and some random ones)
are stored. When every line of a step has its token strings, the step's token ledger is
stored too: each distinct string is one token (an id of the run's vocabulary, the one it
already has for that text or a new one: ``store.step_writes.write_imported_ledgers``).
Recognised keys per line (first match wins):

- policy log-probs: policy_logprobs, logprobs, policy_log_probs, log_probs, policy_logps
- reference log-probs: ref_logprobs, ref_log_probs, reference_logprobs, ref_logps
- optional per token: rollout_logprobs, entropies, mask (response_mask, loss_mask), tokens
- optional per sequence: reward (score), prompt, response (completion, text), step
  (global_step, iteration), kl_coef (beta); any other number is averaged over the step
  and kept as an extra metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import InvalidInput
from monitor.formats import json_safe
from monitor.ingest.importers.base import (
    NotNumeric,
    Problem,
    Tick,
    json_lines,
    to_number,
    to_step,
)
from monitor.ingest.importers.payload_hashes import payload_hash
from monitor.ingest.importers.tables import Prepared, too_long_names
from monitor.ingest.text import clean_text
from monitor.store.metric_info import MetricInfo
from monitor.store.tables import STEP_QUANTITIES

POLICY_KEYS = ("policy_logprobs", "logprobs", "policy_log_probs", "log_probs", "policy_logps")
REF_KEYS = ("ref_logprobs", "ref_log_probs", "reference_logprobs", "ref_logps")
ROLLOUT_KEYS = ("rollout_logprobs", "rollout_log_probs", "sampling_logprobs")
ENTROPY_KEYS = ("entropies", "token_entropies", "entropy")
MASK_KEYS = ("mask", "response_mask", "loss_mask", "completion_mask")
TOKEN_KEYS = ("tokens", "response_tokens")
REWARD_KEYS = ("reward", "score")
STEP_KEYS = ("step", "global_step", "iteration", "_step")
KL_COEF_KEYS = ("kl_coef", "beta")
PROMPT_KEYS = ("prompt",)
RESPONSE_KEYS = ("response", "completion", "text")
TIME_KEYS = ("wall_time", "timestamp", "time")
_KNOWN = {
    *POLICY_KEYS,
    *REF_KEYS,
    *ROLLOUT_KEYS,
    *ENTROPY_KEYS,
    *MASK_KEYS,
    *TOKEN_KEYS,
    *REWARD_KEYS,
    *STEP_KEYS,
    *KL_COEF_KEYS,
    *PROMPT_KEYS,
    *RESPONSE_KEYS,
    *TIME_KEYS,
}

# Samples kept per step, as the live client keeps by default (samples_top, samples_random).
TOP_SAMPLES = 3
RANDOM_SAMPLES = 2


def _first(obj: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in obj and obj[k] is not None:
            return k, obj[k]
    return None, None


def is_token_record(obj: dict[str, Any]) -> bool:
    """A JSON object holding a sequence's policy and reference log-prob lists."""
    return isinstance(_first(obj, POLICY_KEYS)[1], list) and isinstance(
        _first(obj, REF_KEYS)[1], list
    )


@dataclass
class _Seq:
    line: int
    policy: list[float]
    ref: list[float]
    rollout: list[float] | None = None
    entropies: list[float] | None = None
    tokens: list[Any] | None = None
    reward: float | None = None
    prompt: str | None = None
    response: str | None = None
    extras: dict[str, float] = field(default_factory=dict)


class _Bad(ValueError):
    pass


def _floats(name: str, value: Any) -> list[float]:
    if not isinstance(value, list):
        raise _Bad(f"{name} is not a list")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"{name}[{i}] is not a number: {v!r:.30}")
        try:
            out.append(float(v))
        except OverflowError:  # an integer past float64
            raise _Bad(f"{name}[{i}] is not a float64: {str(v)[:30]}...") from None
    return out


def _parse(number: int, obj: dict[str, Any]) -> tuple[int | None, float | None, float | None, _Seq]:
    """(step, kl_coef, wall time, sequence) of one line; _Bad when it cannot be used."""
    seq = _sequence(number, obj)
    try:
        seq.reward = to_number(_first(obj, REWARD_KEYS)[1])
        step_raw = _first(obj, STEP_KEYS)[1]
        step = to_step(step_raw) if step_raw is not None else None
        kl_coef = to_number(_first(obj, KL_COEF_KEYS)[1])
        wall = to_number(_first(obj, TIME_KEYS)[1])
    except (ValueError, NotNumeric) as exc:
        raise _Bad(str(exc)) from None
    _pk, prompt = _first(obj, PROMPT_KEYS)
    _rk, response = _first(obj, RESPONSE_KEYS)
    seq.prompt = clean_text(prompt) if isinstance(prompt, str) else None
    seq.response = clean_text(response) if isinstance(response, str) else None
    seq.extras = _extras(obj)
    return step, kl_coef, wall, seq


def _sequence(number: int, obj: dict[str, Any]) -> _Seq:
    """The line's per-token lists, checked to be as long as its log-probs and cut to its mask."""
    pk, pv = _first(obj, POLICY_KEYS)
    rk, rv = _first(obj, REF_KEYS)
    if pk is None or rk is None:
        raise _Bad(
            "no policy and reference log-prob lists "
            f"(expected one of {POLICY_KEYS[:2]} and one of {REF_KEYS[:2]})"
        )
    policy, ref = _floats(pk, pv), _floats(rk, rv)
    optional = _optional_lists(obj)
    n = len(policy)
    for key, lst in [(rk, ref), *optional.values()]:
        if len(lst) != n:
            raise _Bad(f"{pk} has {n} tokens but {key} has {len(lst)}")
    rollout = optional.get("rollout", (None, None))[1]
    entropies = optional.get("entropies", (None, None))[1]
    tokens = optional.get("tokens", (None, None))[1]
    if "mask" in optional:
        keep = [i for i, m in enumerate(optional["mask"][1]) if m]
        policy = [policy[i] for i in keep]
        ref = [ref[i] for i in keep]
        rollout = [rollout[i] for i in keep] if rollout is not None else None
        entropies = [entropies[i] for i in keep] if entropies is not None else None
        tokens = [tokens[i] for i in keep] if tokens is not None else None
    if not policy:
        raise _Bad("no response tokens (empty, or all masked out)")
    for name, lst in ((pk, policy), (rk, ref), ("rollout log-probs", rollout)):
        if lst is not None and not all(math.isfinite(x) for x in lst):
            raise _Bad(f"{name} holds NaN or infinite values under the mask")
    return _Seq(number, policy, ref, rollout, entropies, tokens)


def _optional_lists(obj: dict[str, Any]) -> dict[str, tuple[str, list[Any]]]:
    """role (rollout, entropies, mask, tokens) -> (key, values) of the lists the line holds."""
    found: dict[str, tuple[str, list[Any]]] = {}
    key, v = _first(obj, ROLLOUT_KEYS)
    if key:
        found["rollout"] = (key, _floats(key, v))
    key, v = _first(obj, ENTROPY_KEYS)
    if key and isinstance(v, list):
        found["entropies"] = (key, _floats(key, v))
    key, v = _first(obj, MASK_KEYS)
    if key:
        found["mask"] = (key, [bool(x) for x in _floats(key, v)])
    key, v = _first(obj, TOKEN_KEYS)
    if key and isinstance(v, list):
        found["tokens"] = (key, [clean_text(str(t)) for t in v])
    return found


def _extras(obj: dict[str, Any]) -> dict[str, float]:
    """The line's other numbers (a scalar entropy included), averaged later over the step."""
    extras: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, list | dict | str) or (k in _KNOWN and k not in ENTROPY_KEYS):
            continue
        try:
            f = to_number(v)
        except NotNumeric:
            continue
        if f is not None:
            extras[clean_text(str(k))] = f  # a name both databases can store
    return extras


@dataclass
class _Steps:
    """A per-token log's sequences grouped by step, with each step's kl_coef and wall time."""

    seqs: dict[int, list[_Seq]] = field(default_factory=dict)
    kl_coefs: dict[int, float] = field(default_factory=dict)
    wall_times: dict[int, float] = field(default_factory=dict)
    step_keys: set[str] = field(default_factory=set)  # the step keys the lines used


def prepare(
    path: Path,
    tick: Tick,
    *,
    default_wall_time: float,
    user_map: dict[str, str | None] | None = None,
) -> Prepared:
    """Read a per-token JSONL and compute klmon's step summaries from it."""
    if user_map:
        raise InvalidInput(
            f"{path}: --map applies to step tables; klmon computes every quantity of a "
            "per-token log itself"
        )
    out = Prepared(fmt="tokens", producer="klmon")
    steps = _read_steps(path, tick, out)
    computed, extra_names = _summarise_steps(steps, out, default_wall_time)
    too_long = too_long_names(extra_names, out.notes, "keys")
    if too_long:
        extra_names -= too_long
        out.metrics = [m for m in out.metrics if m[1] not in too_long]
    out.infos = [
        MetricInfo(
            name=k,
            source="tokens",
            scale="seq",
            description="mean over the step's sequences of the per-line value",
        )
        for k in sorted(extra_names - computed)
    ] + [
        MetricInfo(name=k, source="klmon", description="computed by klmon from the log-probs")
        for k in sorted(computed)
    ]
    out.mapping = {"(computed by klmon)": ["policy/reference log-probs"]}
    out.step_column = next((k for k in STEP_KEYS if k in steps.step_keys), None)
    out.step_source = "detected" if out.step_column else "none: every sequence under step 0"
    out.kl_read = [
        ("policy/reference log-probs", q, q if q != "kl_mean" else "k1", unit)
        for q, unit in (("kl_mean", "nats/sequence"), ("k3", "nats/token"))
    ]
    return out


def _read_steps(path: Path, tick: Tick, out: Prepared) -> _Steps:
    """The file's usable lines grouped by step (no step: step 0); the others are problems."""
    steps = _Steps()
    no_step = 0
    for number, obj in json_lines(path, tick, out.problems):
        if not isinstance(obj, dict):
            out.problems.append(Problem(number, "not a JSON object"))
            continue
        try:
            step, kl_coef, wall, seq = _parse(number, obj)
        except _Bad as exc:
            out.problems.append(Problem(number, str(exc)))
            continue
        out.records_read += 1
        steps.step_keys.update(k for k in STEP_KEYS if k in obj)
        if step is None:
            no_step += 1
            step = 0
        steps.seqs.setdefault(step, []).append(seq)
        if kl_coef is not None:
            steps.kl_coefs[step] = kl_coef
        if wall is not None and 1e8 < wall < 1e10:
            steps.wall_times[step] = max(steps.wall_times.get(step, 0.0), wall)
    if no_step:
        out.notes.append(f"{no_step} sequences had no step: stored under step 0")
    return steps


def _summarise_steps(
    steps: _Steps, out: Prepared, default_wall_time: float
) -> tuple[set[str], set[str]]:
    """Each step's row, metrics, histogram and samples into out.

    Returns the names of the metrics klmon computed and of the per-line extras averaged.
    """
    from monitor.divergence import LEDGER_K, summarize, top_rows  # numpy-only, loaded when needed

    computed: set[str] = set()
    extra_names: set[str] = set()
    local_ids: dict[str, int] = {}  # token string -> id within this file
    for step in sorted(steps.seqs):
        seqs = steps.seqs[step]
        token_ids = None
        if all(s.tokens is not None for s in seqs):
            token_ids = [
                [local_ids.setdefault(t, len(local_ids)) for t in s.tokens or []] for s in seqs
            ]
        rewards = [s.reward for s in seqs]
        rollouts = [s.rollout for s in seqs]
        entropies = [s.entropies for s in seqs]
        try:
            summary = summarize(
                [s.policy for s in seqs],
                [s.ref for s in seqs],
                rewards=rewards if all(r is not None for r in rewards) else None,
                kl_coef=steps.kl_coefs.get(step),
                rollout_logprobs=rollouts if all(r is not None for r in rollouts) else None,
                entropies=entropies if all(e is not None for e in entropies) else None,
                token_ids=token_ids,
            )
        except InvalidInput as exc:
            out.problems.append(Problem(step, f"not summarised: {exc}", "step"))
            continue
        row: dict[str, Any] = {
            "step": step,
            "wall_time": steps.wall_times.get(step, default_wall_time),
        }
        for name, value in summary.as_dict().items():
            if name in STEP_QUANTITIES:
                row[name] = json_safe(value)
            elif value is not None:
                out.metrics.append((step, name, float(value)))
                computed.add(name)
        row["payload_hash"] = payload_hash(row)
        out.steps.append(row)
        out.histograms.append((step, [int(c) for c in np.asarray(summary.token_hist)]))
        if summary.ledger is not None:
            top = top_rows(summary.ledger, LEDGER_K)
            out.ledgers.append((step, top.as_record(summary.n_tokens)))
        out.samples[step] = _samples(step, seqs, np.asarray(summary.seq_kl, dtype=float))
        extras = _extra_means(step, seqs)
        out.metrics.extend(extras)
        extra_names.update(name for _s, name, _v in extras)
    out.token_texts = list(local_ids)  # index: the file's id
    return computed, extra_names


def _extra_means(step: int, seqs: list[_Seq]) -> list[tuple[int, str, float]]:
    """Each per-line extra's mean over the step's sequences that hold it."""
    sums: dict[str, list[float]] = {}
    for s in seqs:
        for k, v in s.extras.items():
            sums.setdefault(k, []).append(v)
    return [(step, k, float(np.mean(vs))) for k, vs in sums.items()]


def _samples(step: int, seqs: list[_Seq], seq_kl: np.ndarray) -> list[dict[str, Any]]:
    order = np.argsort(-seq_kl, kind="stable")
    top = [int(i) for i in order[:TOP_SAMPLES]]
    rest = [i for i in range(len(seqs)) if i not in set(top)]
    rng = np.random.default_rng(step)
    rand = sorted(int(i) for i in rng.permutation(rest)[:RANDOM_SAMPLES]) if rest else []
    chosen = [(i, "top") for i in top] + [(i, "random") for i in rand]
    return [
        {
            "step": step,
            "rank": 0,
            "seq_index": i,
            "kind": kind,
            "kl_seq": float(seq_kl[i]),
            "reward": seqs[i].reward,
            "prompt": seqs[i].prompt,
            "response": seqs[i].response,
            "tokens": seqs[i].tokens,
            "policy_logprobs": seqs[i].policy,
            "ref_logprobs": seqs[i].ref,
        }
        for i, kind in chosen
    ]
