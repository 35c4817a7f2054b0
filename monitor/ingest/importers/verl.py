"""veRL console logs: ``step:N - key:value - key:value ...`` lines.

They sit among everything else a training job prints (tqdm bars with carriage returns,
Ray's ``(TaskRunner pid=...)`` prefixes, warnings, ANSI colours); only step lines are read.
A step line with an item that is not ``key:value``, or a step out of range, and a line that
is not text (a NUL byte, invalid UTF-8) are reported with their number and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from monitor.ingest.importers.base import Problem, RawRecord, RawTable, Tick, text_lines

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
STEP_LINE = re.compile(r"(?:^|[\s)\]>|:])step:\s*(?P<step>\d+)\s+-\s+(?P<body>.*)$")
LOOKS_LIKE = re.compile(r"(?:^|[\s)\]>|:])step:\s*\d+\s+-\s+[^\s:]+:")
_RAY_SUFFIX = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable(step_key="step", step_source="step:N of each line")
    other = 0
    for number, line in text_lines(path, tick, table.problems):
        found = False
        for part in line.split("\r"):
            m = STEP_LINE.search(strip_ansi(part).rstrip())
            if m is None:
                continue
            found = True
            values, bad = _items(_RAY_SUFFIX.sub("", m.group("body")))
            if bad is not None:
                table.problems.append(Problem(number, f"unreadable item {bad[:60]!r}"))
                continue
            values["step"] = m.group("step")
            table.records.append(RawRecord(number, values))
        if not found:
            other += 1
    if other:
        table.notes.append(f"{other} other lines of console output ignored")
    return table


def _items(body: str) -> tuple[dict[str, str], str | None]:
    values: dict[str, str] = {}
    for item in body.split(" - "):
        key, sep, value = item.partition(":")
        key = key.strip()
        if not sep or not key or " " in key:
            return values, item
        values[key] = value.strip()
    return values, None
