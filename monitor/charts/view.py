"""What a panel of charts shows (``View``: runs, step range, smoothing, x axis, extra
metrics, KL axis), read from and written to a URL query, so a comparison is a link.

Every field comes from the URL (or a browser-held store) and is validated: a bad parameter
becomes a warning and its default, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

from monitor.store.series import MAX_STEP

MAX_RUNS = 12
MAX_METRICS = 8
MAX_QUERY_LENGTH = 4000
X_MODES = ("step", "wall")
KL_AXES = ("linear", "log")


@dataclass(frozen=True)
class View:
    """What a panel shows; every field comes from the URL and is validated."""

    runs: tuple[int, ...] = ()
    start: int | None = None
    end: int | None = None
    smooth: float = 0.0
    x: str = "step"
    metrics: tuple[str, ...] = ()
    step: int | None = None
    kl_log: bool = False  # a log y axis on the KL charts (URL: klaxis=log)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runs"], d["metrics"] = list(self.runs), list(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> View:
        """From a dcc.Store (browser-held, so checked like a query)."""
        if not isinstance(d, Mapping):
            return cls()
        view, _ = parse_params(
            {
                "runs": ",".join(str(r) for r in d.get("runs") or []),
                "from": d.get("start"),
                "to": d.get("end"),
                "smooth": d.get("smooth"),
                "x": d.get("x"),
                "metrics": ",".join(str(m) for m in d.get("metrics") or []),
                "step": d.get("step"),
                "klaxis": "log" if d.get("kl_log") is True else None,
            }
        )
        return view


def _int_param(name: str, raw: Any, warnings: list[str]) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        warnings.append(f"ignored {name}={str(raw)[:40]!r}: not a whole number")
        return None
    if not 0 <= value <= MAX_STEP:
        warnings.append(f"ignored {name}={value}: outside 0..{MAX_STEP}")
        return None
    return value


def parse_params(params: Mapping[str, Any]) -> tuple[View, list[str]]:
    """A View from single-valued parameters; problems become warnings, never errors."""
    warnings: list[str] = []
    runs: list[int] = []
    for tok in str(params.get("runs") or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if not tok.isdigit() or len(tok) > 12:
            warnings.append(f"ignored run {tok[:40]!r}: not a run id")
            continue
        if int(tok) not in runs:
            runs.append(int(tok))
    if len(runs) > MAX_RUNS:
        warnings.append(f"showing the first {MAX_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_RUNS]
    start = _int_param("from", params.get("from"), warnings)
    end = _int_param("to", params.get("to"), warnings)
    if start is not None and end is not None and start > end:
        warnings.append(f"ignored from={start} and to={end}: from is after to")
        start = end = None
    smooth = 0.0
    raw = params.get("smooth")
    if raw not in (None, ""):
        try:
            smooth = float(str(raw))
            if not (math.isfinite(smooth) and 0.0 <= smooth < 1.0):
                raise ValueError
        except ValueError:
            warnings.append(f"ignored smooth={str(raw)[:40]!r}: use a number in [0, 1)")
            smooth = 0.0
    x = str(params.get("x") or "step")
    if x not in X_MODES:
        warnings.append(f"ignored x={x[:40]!r}: use step or wall")
        x = "step"
    metrics: list[str] = []
    for name in str(params.get("metrics") or "").split(","):
        name = name.strip()
        if not name:
            continue
        if len(name) > 200:
            warnings.append("ignored a metric name longer than 200 characters")
            continue
        if name not in metrics:
            metrics.append(name)
    if len(metrics) > MAX_METRICS:
        warnings.append(f"showing the first {MAX_METRICS} of {len(metrics)} metrics")
        metrics = metrics[:MAX_METRICS]
    step = _int_param("step", params.get("step"), warnings)
    klaxis = str(params.get("klaxis") or "linear")
    if klaxis not in KL_AXES:
        warnings.append(f"ignored klaxis={klaxis[:40]!r}: use linear or log")
        klaxis = "linear"
    view = View(tuple(runs), start, end, round(smooth, 4), x, tuple(metrics), step, klaxis == "log")
    return view, warnings


def parse_query(search: str | None) -> tuple[View, list[str]]:
    """A View from a URL query string (``?runs=3,7&from=0&to=5000&smooth=0.9&x=step``)."""
    search = (search or "").lstrip("?")
    if len(search) > MAX_QUERY_LENGTH:
        return View(), [f"ignored a query string of {len(search)} characters"]
    try:
        qs = parse_qs(search, keep_blank_values=False, max_num_fields=32)
    except ValueError:
        return View(), ["ignored a query string with too many fields"]
    return parse_params({k: v[-1] for k, v in qs.items()})


def to_query(view: View) -> str:
    """The query string that reopens ``view`` (without the defaults)."""
    q: dict[str, Any] = {}
    if view.runs:
        q["runs"] = ",".join(str(r) for r in view.runs)
    if view.start is not None:
        q["from"] = view.start
    if view.end is not None:
        q["to"] = view.end
    if view.smooth:
        q["smooth"] = f"{view.smooth:g}"
    if view.x != "step":
        q["x"] = view.x
    if view.metrics:
        q["metrics"] = ",".join(view.metrics)
    if view.step is not None:
        q["step"] = view.step
    if view.kl_log:
        q["klaxis"] = "log"
    return "?" + urlencode(q, safe=",") if q else ""
