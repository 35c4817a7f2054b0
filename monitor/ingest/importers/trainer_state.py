"""Hugging Face ``trainer_state.json``: the ``log_history`` TRL and every HF Trainer save.

Rows of ``log_history`` are of three kinds: training rows (TRL PPO, GRPO, RLOO, DPO, ... each
with its own keys, which may change between rows), evaluation rows (``eval_*`` keys, kept as
metrics named ``eval/<key>`` like HF's W&B callback does, never mapped to a quantity), and
the summary row ``trainer.train()`` appends at the end (``train_runtime``, ``train_loss``:
not a step; it goes into the run config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import Problem, RawRecord, RawTable, Tick, TooDeep, flatten

SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
)
UNIT = "log_history entry"


def load_json(path: Path) -> Any:
    """A whole JSON document (bare NaN/Infinity accepted, as Python's json does)."""
    try:
        with path.open("r", encoding="utf-8-sig") as fh:
            return json.load(fh)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {exc.start}); expected JSON") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except RecursionError:
        raise InvalidInput(f"{path}: JSON nested too deeply to parse") from None


def is_trainer_state(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("log_history"), list)


def read(path: Path, tick: Tick) -> RawTable:
    doc = load_json(path)
    if not is_trainer_state(doc):
        raise InvalidInput(
            f"{path}: expected a Hugging Face trainer_state.json (a JSON object with a "
            "log_history list)"
        )
    table = RawTable(step_key="step", step_source="log_history")
    table.config["trainer_state"] = {k: v for k, v in doc.items() if k != "log_history"}
    for number, row in enumerate(doc["log_history"], start=1):
        if not isinstance(row, dict):
            table.problems.append(
                Problem(number, f"a JSON {type(row).__name__}, not an object", UNIT)
            )
            continue
        if SUMMARY_KEYS & row.keys():
            table.config.setdefault("train_summary", {}).update(row)
            continue
        try:
            values = flatten(row)
        except TooDeep as exc:
            table.problems.append(Problem(number, str(exc), UNIT))
            continue
        kind = "train"
        if any(k.startswith("eval_") for k in values):
            kind = "eval"
            values = {_eval_name(k): v for k, v in values.items()}
        table.records.append(RawRecord(number, values, kind))
    tick(path.stat().st_size)
    if table.config.get("train_summary"):
        table.notes.append("the train_runtime summary row went into the run config, not a step")
    return table


def _eval_name(key: str) -> str:
    if key in ("step", "epoch"):
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "eval/" + key
