"""Steps built from several calls on one rank: micro-batches of different widths, gradient
accumulation passes. ``Run.add_to_step`` validates and copies each part at its call (so a
bad part is refused where it was passed); closing the step merges the parts into one
:class:`~monitor.ingest.writer.StepItem`, exactly what one ``log_step`` call carrying every
row would have made: rows concatenated in call order, each part right-padded to the widest
(padding outside the mask, so no statistic sees it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.errors import InvalidInput
from monitor.ingest.step_input import EMPTY_RESPONSES_METRIC, all_empty_reason
from monitor.ingest.tensors import now, resolve_arrays
from monitor.ingest.writer import StepItem

#: Extra metric: parts of a step left out because they were invalid (``on_invalid="log"``).
REJECTED_PARTS_METRIC = "klmon/rejected_parts"

# Optional per-row inputs: a step's parts must all carry them or all leave them out.
_OPTIONAL = ("rewards", "texts", "tokens")


@dataclass
class OpenStep:
    """The parts of the step being built, and the reasons of the parts refused."""

    step: int
    parts: list[StepItem] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def add(self, item: StepItem) -> None:
        """Add a validated part; InvalidInput when it carries other optional inputs than the
        parts before it (rewards for some rows and not others cannot be one step)."""
        if self.parts:
            first = self.parts[0]
            for name in _OPTIONAL:
                if (getattr(first, name) is None) != (getattr(item, name) is None):
                    raise InvalidInput(
                        f"step {self.step}: {name} given for some of its parts and not others"
                    )
            if set(first.extra or ()) != set(item.extra or ()):
                raise InvalidInput(
                    f"step {self.step}: rollout_logprobs/entropies given for some of its parts "
                    "and not others"
                )
        resolve_arrays(item)  # parts are concatenated at close: their values are needed
        self.parts.append(item)

    def merged(self) -> StepItem:
        """One StepItem for the whole step (``rejected`` when no part is usable)."""
        if not self.parts:
            reason = self.refused[0] if self.refused else "no part was logged"
            return StepItem(self.step, 0.0, None, None, None, rejected=reason)
        item = merge_parts(self.parts)
        if self.refused:
            item.metrics = {**(item.metrics or {}), REJECTED_PARTS_METRIC: len(self.refused)}
        if item.mask is not None and not item.mask.any():
            item.rejected = all_empty_reason(item.mask.shape[0])
        return item


def merge_parts(parts: Sequence[StepItem]) -> StepItem:
    """Concatenate parts' rows, right-padding each to the widest part."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.policy_logprobs.shape[1] for p in parts)  # type: ignore[union-attr]
    masks = [_full_mask(p) for p in parts]
    any_mask = any(p.mask is not None for p in parts)
    first = parts[0]
    metrics: dict[str, Any] = {}
    n_empty = 0
    for p in parts:
        for k, v in (p.metrics or {}).items():
            if k == EMPTY_RESPONSES_METRIC:
                n_empty += int(v)
            else:
                metrics[k] = v
    if n_empty:
        metrics[EMPTY_RESPONSES_METRIC] = n_empty
    extra = None
    if first.extra:
        extra = {k: _pad_cat([p.extra[k] for p in parts], width) for k in first.extra}  # type: ignore[index]
    return StepItem(
        step=first.step,
        wall_time=first.wall_time,
        policy_logprobs=_pad_cat([p.policy_logprobs for p in parts], width),
        ref_logprobs=_pad_cat([p.ref_logprobs for p in parts], width),
        mask=_pad_cat(masks, width) if any_mask else None,
        rewards=None if first.rewards is None else np.concatenate([p.rewards for p in parts]),
        kl_coef=next((p.kl_coef for p in reversed(parts) if p.kl_coef is not None), None),
        texts=_cat_texts(parts),
        tokens=_cat_tokens(parts, masks),
        metrics=metrics or None,
        extra=extra,
        token_ids=_cat_token_ids(parts, width),
        token_ids_problem=next(
            (p.token_ids_problem for p in parts if p.token_ids_problem is not None), None
        ),
    )


def _cat_token_ids(parts: Sequence[StepItem], width: int) -> np.ndarray | None:
    """The parts' ids padded like the log-probs (0 outside the mask); None unless every part
    carries usable ids (a step's ledger is of all its tokens or none)."""
    if any(p.token_ids is None for p in parts):
        return None
    return _pad_cat([now(p.token_ids) for p in parts], width)


def _full_mask(p: StepItem) -> np.ndarray:
    assert p.policy_logprobs is not None
    return np.ones(p.policy_logprobs.shape, dtype=bool) if p.mask is None else p.mask


def _pad_cat(arrays: Sequence[Any], width: int) -> np.ndarray:
    dtype = np.result_type(*arrays)
    out = np.zeros((sum(a.shape[0] for a in arrays), width), dtype=dtype)
    row = 0
    for a in arrays:
        out[row : row + a.shape[0], : a.shape[1]] = a
        row += a.shape[0]
    return out


def _cat_texts(parts: Sequence[StepItem]) -> tuple[list[Any] | None, list[Any] | None] | None:
    if parts[0].texts is None:
        return None
    cols: list[list[Any] | None] = []
    for i in (0, 1):
        if any(p.texts[i] is None for p in parts):  # type: ignore[index]
            cols.append(None)
        else:
            cols.append([t for p in parts for t in p.texts[i]])  # type: ignore[index]
    return cols[0], cols[1]


def _cat_tokens(parts: Sequence[StepItem], masks: Sequence[np.ndarray]) -> list[Any] | None:
    """Tokens aligned with a part's own columns become its response tokens: once padded to
    another width they would no longer line up with the columns."""
    if parts[0].tokens is None:
        return None
    out: list[Any] = []
    for p, m in zip(parts, masks, strict=True):
        width = m.shape[1]
        for row, toks in zip(m, p.tokens, strict=True):  # type: ignore[arg-type]
            if toks is not None and len(toks) == width and not row.all():
                toks = [t for t, keep in zip(toks, row, strict=True) if keep]
            out.append(toks)
    return out
