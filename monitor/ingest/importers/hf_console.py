"""Hugging Face / TRL console logs: the Trainer's printed ``{'loss': ..., 'kl': ...}`` dicts.

Often the only log a run leaves (stdout captured to a file). The Trainer prints one dict per
logging step (``ProgressCallback`` writes ``str(logs)``), among everything else the job
prints: tqdm bars joined by carriage returns, warnings, logger lines. Values are numbers or,
in recent TRL, strings (``'0.06238'``); ``nan``/``inf`` and wrapped reprs
(``np.float64(0.5)``, ``tensor(0.5)``) are read too. The step is the order of the training
dicts (1, 2, ...): the console does not print the global step, so with ``logging_steps`` N
the Hugging Face step is N times it. Evaluation dicts (``eval_*`` keys) join the step of the
training dict before them, as ``eval/<key>`` metrics; the ``{'train_runtime': ...}`` summary
goes into the run config. A dict that cannot be parsed is reported with its line number.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from monitor.ingest.importers.base import (
    Problem,
    RawRecord,
    RawTable,
    Tick,
    TooDeep,
    flatten,
    text_lines,
)
from monitor.ingest.importers.trainer_state import SUMMARY_KEYS

# A printed dict alone on its line (or after a tqdm bar's carriage return).
DICT_LINE = re.compile(r"^\s*(?P<dict>\{\s*'[^'\n]{1,200}'\s*:.*\})\s*$")
# Keys the Trainer adds to what it prints: a dict without any of them is someone else's.
TRAINER_KEYS = frozenset({"epoch", "loss", "learning_rate", "grad_norm", "eval_loss"})
# Bare float reprs and wrapped numbers that ast.literal_eval does not read.
_BARE = re.compile(r"(?<=[:\[,]\s)(-?(?:nan|inf))(?=\s*[,}\]])")
_WRAPPED = re.compile(r"(?<=:\s)((?:np|numpy|torch)\.\w+|tensor|array)\((?P<num>[^()]*)\)")
MAX_LINE = 1 << 20  # a printed dict longer than 1 MiB is not a training log
_SNIFF_BYTES = 8 << 20
_TOTAL_STEPS = re.compile(r"Total optimization steps = ([\d,]+)")
UNIT = "line"


def parse_dict(text: str) -> dict[str, Any]:
    """The dict printed on a line; ValueError saying why not."""
    if len(text) > MAX_LINE:
        raise ValueError(f"a printed dict of {len(text)} characters (at most {MAX_LINE})")
    body = _BARE.sub(r"'\1'", text)
    body = _WRAPPED.sub(lambda m: repr(m.group("num").split(",")[0].strip()), body)
    try:
        obj = ast.literal_eval(body)
    except RecursionError:
        raise TooDeep("nested too deeply to parse") from None
    except (ValueError, SyntaxError, TypeError, MemoryError) as exc:
        raise ValueError(f"not a readable dict ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError("not a dict with string keys")
    return flatten(obj)


def is_console_dict(line: str) -> bool:
    """A line that holds a Trainer's printed log dict (used by format detection)."""
    for part in line.split("\r"):
        m = DICT_LINE.match(part)
        if m and any(f"'{k}'" in m.group("dict") for k in (*TRAINER_KEYS, *SUMMARY_KEYS)):
            return True
    return False


def looks_like(path: Path) -> bool:
    """Whether the first few MiB of ``path`` (the lines starting in them) hold a printed
    Trainer dict; a block without ``{'`` is answered without a loop over its lines."""
    with path.open("rb") as fh:
        block = fh.read(_SNIFF_BYTES + 1)
        block += fh.readline()
    if b"{'" not in block:
        return False
    return any(
        b"{'" in raw and is_console_dict(raw.decode("utf-8", errors="replace"))
        for raw in block.split(b"\n")
    )


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable(step_key="step", step_source="the order of the Trainer's printed dicts")
    other = 0
    step = 0
    total: str | None = None
    for number, line in text_lines(path, tick, table.problems):
        found = False
        for part in line.split("\r"):
            m = DICT_LINE.match(part)
            if m is None:
                continue
            try:
                values = parse_dict(m.group("dict"))
            except ValueError as exc:
                if "'" in part and any(f"'{k}'" in part for k in TRAINER_KEYS):
                    table.problems.append(Problem(number, str(exc), UNIT))
                    found = True
                continue
            if not TRAINER_KEYS & values.keys() and not SUMMARY_KEYS & values.keys():
                continue  # a dict someone else printed
            found = True
            if SUMMARY_KEYS & values.keys():
                table.config.setdefault("train_summary", {}).update(values)
            elif any(k.startswith("eval_") for k in values):
                evals = {_eval_name(k): v for k, v in values.items() if k != "epoch"}
                evals["step"] = step
                table.records.append(RawRecord(number, evals, "eval"))
            else:
                step += 1
                values["step"] = step
                table.records.append(RawRecord(number, values))
        if not found:
            other += 1
            if total is None:
                t = _TOTAL_STEPS.search(line)
                total = t.group(1).replace(",", "") if t else None
    table.notes.append(
        f"step = order of the Trainer's printed dicts (1 to {step}); with logging_steps N the "
        "Hugging Face global step is N times it"
        + (f" (the log says Total optimization steps = {total})" if total else "")
    )
    if table.config.get("train_summary"):
        table.notes.append("the train_runtime summary dict went into the run config, not a step")
    if other:
        table.notes.append(f"{other} other lines of console output ignored")
    return table


def _eval_name(key: str) -> str:
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else "eval/" + key
