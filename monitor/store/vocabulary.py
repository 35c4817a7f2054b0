"""Reads of the token ledger (the "drift vocabulary"): which token ids carry a run's
``log p - log q`` over a step range, as step buckets for a heatmap, and what changed between
two steps or two runs.

What is stored (``monitor/store/step_writes.py``, tables ``token_ledger``,
``token_ledger_steps``, ``token_vocab``): per step, the ``K`` ids with the largest positive
and the ``K`` with the most negative sums of ``l_t`` (count and sum, exact over the batch),
and the masses of the step's whole ledger (``pos_mass``: sum over ids of max(sum, 0),
``neg_mass``: of min(sum, 0)) and its token count. So, over a range:

- ``count`` and ``lr_sum`` of an id add its stored rows: exact for the steps where the id
  was in one of the step's top-K lists, nothing for the others (a lower bound of its count;
  its sum misses only contributions too small to be in a step's top K).
- ``share_pos = max(lr_sum, 0) / (sum of the steps' pos_mass)``, ``share_neg = -min(lr_sum, 0)
  / -(sum of the steps' neg_mass)``: exact denominators, from every token of the range.

A range of at most ``RAW_MAX_STEPS`` steps is a GROUP BY over its raw rows (2 K per step
at most), exact as said above. A longer one is read from the power-of-two rollups of
``monitor/store/ledger_rollups.py`` (built lazily here): O(log n) stored buckets plus the raw
rows at its edges, so a million-step run answers like a short one. Masses, token and step
counts stay exact; an id's ``count``/``lr_sum``/``n_steps`` then add the buckets where it
ranked in the bucket's top ``ROLLUP_K`` (64) by positive or by negative sum: the ids that
carry the range are counted in full, small ones may be under-counted. Over a long range
:func:`read_token_ledger_buckets` rounds its inner bucket edges to multiples of
``2**BASE_LEVEL`` (64) steps (``step_lo``/``step_hi`` say where each bucket is).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sqlalchemy import Connection, text

from monitor.errors import InvalidInput
from monitor.store.database import Database
from monitor.store.ledger_rollups import (
    BASE_LEVEL,
    MASSES,
    RAW_MAX_STEPS,
    ROLLUPS,
    Pieces,
    ensure_ledger_rollups,
    pieces_sql,
    range_pieces,
    stored_frontiers,
)
from monitor.store.series import MAX_STEP

#: Which side of the ledger a read ranks: the largest positive sums (the policy now prefers
#: the token) or the most negative ones (the reference preferred it).
Side = Literal["pos", "neg"]

#: Columns of :func:`read_token_ledger`.
LEDGER_COLUMNS = ("token_id", "token", "count", "lr_sum", "share_pos", "share_neg", "n_steps")
#: Columns of :func:`read_token_ledger_buckets`.
BUCKET_COLUMNS = (
    "token_id",
    "token",
    "bucket",
    "step_lo",
    "step_hi",
    "count",
    "lr_sum",
    "share_pos",
)
#: Columns of :func:`token_changes` and :func:`token_changes_between_runs`.
CHANGE_COLUMNS = (
    "token_id",
    "token",
    "count_before",
    "count_after",
    "per_1k_before",
    "per_1k_after",
    "lr_sum_before",
    "lr_sum_after",
    "lr_per_1k_before",
    "lr_per_1k_after",
    "growth",
)


def read_token_ledger(
    db: Database,
    run_id: int,
    step_min: int | None = None,
    step_max: int | None = None,
    k: int = 32,
    side: Side = "pos",
) -> pd.DataFrame:
    """The ``k`` token ids of the range with the largest positive ``lr_sum`` (``side="pos"``,
    largest first) or the most negative (``side="neg"``, most negative first).

    Columns :data:`LEDGER_COLUMNS`: ``token`` is the text (None when the run has no
    vocabulary for the id), ``n_steps`` the steps of the range that stored the id. The
    frame's ``attrs`` hold the range's ``pos_mass``, ``neg_mass``, ``n_tokens`` and
    ``n_steps`` (steps with a ledger). Empty when the range has no ledger."""
    lo, hi = _range(step_min, step_max)
    _check_k(k)
    order = "DESC" if _side(side) == "pos" else "ASC"
    sign = ">" if side == "pos" else "<"
    ensure_ledger_rollups(db, run_id, lo, hi)
    with db.begin() as conn:
        pieces = _pieces(conn, run_id, lo, hi)
        masses = _masses(conn, run_id, pieces)
        rows = _id_sums(
            conn,
            run_id,
            pieces,
            f"HAVING SUM(s) {sign} 0 ORDER BY SUM(s) {order}, token_id LIMIT {int(k)}",
        )
        texts = _texts(conn, run_id, [int(r[0]) for r in rows])
    df = pd.DataFrame(
        {
            "token_id": np.array([int(r[0]) for r in rows], dtype=np.int64),
            "token": pd.Series([texts.get(int(r[0])) for r in rows], dtype=object),
            "count": np.array([int(r[1]) for r in rows], dtype=np.int64),
            "lr_sum": np.array([float(r[2]) for r in rows], dtype=np.float64),
            "n_steps": np.array([int(r[3]) for r in rows], dtype=np.int64),
        }
    )
    _add_shares(df, masses["pos_mass"], masses["neg_mass"])
    df = df[list(LEDGER_COLUMNS)]
    df.attrs.update(masses)
    return df


def read_token_ledger_buckets(
    db: Database,
    run_id: int,
    step_min: int,
    step_max: int,
    n_buckets: int,
    k: int = 16,
    side: Side = "pos",
) -> pd.DataFrame:
    """Token x step-bucket contributions of the range's top ``k`` ids (as
    :func:`read_token_ledger` ranks them), for a heatmap: one row per (id, bucket) holding
    stored rows, long format, columns :data:`BUCKET_COLUMNS`.

    The range [step_min, step_max] is cut into ``n_buckets`` buckets of equal step width
    (bucket ``b`` covers ``[step_lo, step_hi]``); ``share_pos`` is ``max(lr_sum, 0)`` over the
    bucket's positive mass (NaN when it has none). ``attrs["buckets"]``: a frame of every
    bucket (``bucket``, ``step_lo``, ``step_hi``, ``pos_mass``, ``neg_mass``, ``n_tokens``)."""
    lo, hi = _range(step_min, step_max)
    if not isinstance(n_buckets, int) or n_buckets < 1:
        raise InvalidInput(f"n_buckets is {n_buckets!r}: expected a positive integer")
    top = read_token_ledger(db, run_id, lo, hi, k, side)  # brings the rollups up to date
    span = hi - lo + 1
    n_buckets = min(n_buckets, span)
    edges = [lo + (b * span + n_buckets - 1) // n_buckets for b in range(n_buckets + 1)]
    ids = [int(i) for i in top["token_id"]]
    size = 1 << BASE_LEVEL
    with db.begin() as conn:
        done = stored_frontiers(conn, run_id) if span > RAW_MAX_STEPS else {}
        if done and span >= size * n_buckets:  # inner edges on base bucket boundaries
            edges = [lo] + [(e + size // 2) // size * size for e in edges[1:-1]] + [hi + 1]
            per_bucket, rows = _buckets_from_pieces(conn, run_id, edges, done, ids)
        else:
            per_bucket, rows = _buckets_from_raw(conn, run_id, lo, hi, n_buckets, ids)
    buckets = pd.DataFrame(
        {
            "bucket": np.arange(n_buckets, dtype=np.int64),
            "step_lo": np.array(edges[:-1], dtype=np.int64),
            "step_hi": np.array(edges[1:], dtype=np.int64) - 1,
            "pos_mass": per_bucket[:, 0],
            "neg_mass": per_bucket[:, 1],
            "n_tokens": np.rint(per_bucket[:, 2]).astype(np.int64),
        }
    )
    texts = dict(zip(top["token_id"], top["token"], strict=True))
    b_idx = np.array([int(r[1]) for r in rows], dtype=np.int64)
    lr = np.array([float(r[3]) for r in rows], dtype=np.float64)
    pos_mass = buckets["pos_mass"].to_numpy()[b_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(pos_mass > 0, np.maximum(lr, 0.0) / pos_mass, np.nan)
    df = pd.DataFrame(
        {
            "token_id": np.array([int(r[0]) for r in rows], dtype=np.int64),
            "token": pd.Series([texts.get(int(r[0])) for r in rows], dtype=object),
            "bucket": b_idx,
            "step_lo": buckets["step_lo"].to_numpy()[b_idx],
            "step_hi": buckets["step_hi"].to_numpy()[b_idx],
            "count": np.array([int(r[2]) for r in rows], dtype=np.int64),
            "lr_sum": lr,
            "share_pos": share,
        }
    )
    df.attrs["buckets"] = buckets
    return df


def token_changes(
    db: Database,
    run_id: int,
    step_a: int,
    step_b: int,
    window: int = 1,
    k: int = 20,
    side: Side = "pos",
) -> pd.DataFrame:
    """What changed between steps A and B of a run: the token ids whose contribution grew
    most (``side="pos"``) or fell most (``side="neg"``) from the ``window`` steps ending at
    ``step_a`` ("before") to the ``window`` steps ending at ``step_b`` ("after").

    Columns :data:`CHANGE_COLUMNS`. Contributions are per 1k tokens of their window, so
    windows of different sizes compare: ``lr_per_1k = 1000 * lr_sum / n_tokens`` and
    ``per_1k = 1000 * count / n_tokens`` (how often the policy emits the token; a token
    emitted 50x more often shows there), ``growth = lr_per_1k_after - lr_per_1k_before``.
    An id absent from a window's stored ledger counts 0 there. ``attrs``: each window's
    ``n_tokens_before``/``n_tokens_after``."""
    if not isinstance(window, int) or window < 1:
        raise InvalidInput(f"window is {window!r}: expected a positive integer (steps)")
    before = (int(step_a) - window + 1, int(step_a))
    after = (int(step_b) - window + 1, int(step_b))
    return token_changes_between_runs(db, run_id, before, run_id, after, k=k, side=side)


def token_changes_between_runs(
    db: Database,
    run_a: int,
    range_a: tuple[int | None, int | None],
    run_b: int,
    range_b: tuple[int | None, int | None],
    k: int = 20,
    side: Side = "pos",
) -> pd.DataFrame:
    """:func:`token_changes` between two runs (or two ranges of one run): ``range_a`` of
    ``run_a`` is "before", ``range_b`` of ``run_b`` "after" (each ``(step_min, step_max)``,
    None for open). Ids compare across runs when both use the same tokenizer; ``token`` is
    run B's text of the id, else run A's."""
    _check_k(k)
    _side(side)
    ra, rb = _range(*range_a), _range(*range_b)
    ensure_ledger_rollups(db, run_a, *ra)
    ensure_ledger_rollups(db, run_b, *rb)
    with db.begin() as conn:
        a, n_a = _window(conn, run_a, *ra)
        b, n_b = _window(conn, run_b, *rb)
        df = a.add_suffix("_before").join(b.add_suffix("_after"), how="outer").fillna(0.0)
        for when, n in (("before", n_a), ("after", n_b)):
            scale = 1000.0 / n if n > 0 else np.nan
            df[f"per_1k_{when}"] = df[f"count_{when}"] * scale
            df[f"lr_per_1k_{when}"] = df[f"lr_sum_{when}"] * scale
        df["growth"] = df["lr_per_1k_after"] - df["lr_per_1k_before"]
        df = df.reset_index()
        df = df.sort_values(["growth", "token_id"], ascending=[side == "neg", True], kind="stable")
        df = df[df["growth"] > 0] if side == "pos" else df[df["growth"] < 0]
        df = df.head(k)
        ids = [int(i) for i in df["token_id"]]
        texts = {**_texts(conn, run_a, ids), **_texts(conn, run_b, ids)}
    df["token"] = pd.Series(
        [texts.get(int(i)) for i in df["token_id"]], dtype=object, index=df.index
    )
    for c in ("count_before", "count_after"):
        df[c] = df[c].astype(np.int64)
    df = df[list(CHANGE_COLUMNS)].reset_index(drop=True)
    df.attrs.update(n_tokens_before=n_a, n_tokens_after=n_b)
    return df


# --- helpers ------------------------------------------------------------------------------------


def _range(step_min: int | None, step_max: int | None) -> tuple[int, int]:
    lo = 0 if step_min is None else int(step_min)
    hi = MAX_STEP if step_max is None else int(step_max)
    if lo > hi:
        raise InvalidInput(f"step_min {lo} is after step_max {hi}")
    return lo, hi


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k is {k!r}: expected a positive integer")


def _side(side: str) -> str:
    if side not in ("pos", "neg"):
        raise InvalidInput(f"side is {side!r}: expected 'pos' or 'neg'")
    return side


def _buckets_from_raw(
    conn: Connection, run_id: int, lo: int, hi: int, n_buckets: int, ids: list[int]
) -> tuple[np.ndarray, list[Any]]:
    """Per equal-width bucket, (pos_mass, neg_mass, n_tokens) and the (token_id, bucket,
    count, lr_sum) of ``ids``, grouped in SQL over the raw rows."""
    span = hi - lo + 1
    # bucket of step s: the b with edges[b] <= s < edges[b + 1], i.e. floor((s-lo)*n/span)
    bucket_sql = "((step - :lo) * :n) / :span"
    params: dict[str, Any] = {"r": run_id, "lo": lo, "hi": hi, "n": n_buckets, "span": span}
    per_bucket = np.zeros((n_buckets, 3))
    for b, pos, neg, n in conn.execute(
        text(
            f"SELECT {bucket_sql} AS b, SUM(pos_mass), SUM(neg_mass), SUM(n_tokens) "
            "FROM token_ledger_steps WHERE run_id = :r AND step >= :lo AND step <= :hi "
            "GROUP BY b"
        ),
        params,
    ):
        per_bucket[int(b)] = (float(pos), float(neg), float(n))
    if not ids:
        return per_bucket, []
    marks = ", ".join(str(int(i)) for i in ids)
    rows = conn.execute(
        text(
            f"SELECT token_id, {bucket_sql} AS b, SUM(count), SUM(lr_sum) "
            "FROM token_ledger WHERE run_id = :r AND step >= :lo AND step <= :hi "
            f"AND token_id IN ({marks}) GROUP BY token_id, b ORDER BY token_id, b"
        ),
        params,
    ).all()
    return per_bucket, rows


def _buckets_from_pieces(
    conn: Connection, run_id: int, edges: list[int], done: dict[int, int], ids: list[int]
) -> tuple[np.ndarray, list[Any]]:
    """:func:`_buckets_from_raw` for buckets whose inner edges are on base-bucket
    boundaries: each bucket read from stored rollup buckets plus raw rows at the ends."""
    whole = Pieces.union(
        [range_pieces(a, b - 1, done, raw_max=0) for a, b in itertools.pairwise(edges)]
    )
    edge_arr = np.array(edges, dtype=np.int64)

    def fetch(raw_cols: str, rollup_cols: str, raw: str, rollup: str, extra: str = "") -> Any:
        union, params = pieces_sql(
            whole, f"step AS s0, 0 AS lv, {raw_cols}", f"bucket AS s0, level AS lv, {rollup_cols}",
            raw, rollup, extra,
        )  # fmt: skip
        rows = conn.execute(text(union), {"r": run_id, **params}).all()
        first = np.array([int(r[0]) << int(r[1]) for r in rows], dtype=np.int64)
        cols = [np.array([r[j] for r in rows], dtype=np.float64) for j in range(2, 5)]
        return np.searchsorted(edge_arr, first, side="right") - 1, cols

    cols = "pos_mass AS pm, neg_mass AS nm, n_tokens AS t"
    b, masses = fetch(cols, cols, "token_ledger_steps", MASSES)
    per_bucket = np.stack(
        [np.bincount(b, weights=m, minlength=len(edges) - 1) for m in masses], axis=1
    )
    if not ids:
        return per_bucket, []
    cols = "token_id, count AS c, lr_sum AS s"
    b, (tok, count, lr) = fetch(
        cols, cols, "token_ledger", ROLLUPS, f"token_id IN ({', '.join(str(i) for i in ids)})"
    )
    frame = pd.DataFrame(
        {"token_id": tok.astype(np.int64), "b": b, "count": count.astype(np.int64), "lr": lr}
    )
    summed = frame.groupby(["token_id", "b"], sort=True).sum().reset_index()
    return per_bucket, list(summed.itertuples(index=False, name=None))


def _pieces(conn: Connection, run_id: int, lo: int, hi: int) -> Pieces:
    if hi - lo + 1 <= RAW_MAX_STEPS:
        return Pieces([(lo, hi)], [])
    return range_pieces(lo, hi, stored_frontiers(conn, run_id))


def _masses(conn: Connection, run_id: int, pieces: Pieces) -> dict[str, Any]:
    union, params = pieces_sql(
        pieces,
        "pos_mass AS pm, neg_mass AS nm, n_tokens AS t, 1 AS c",
        "pos_mass AS pm, neg_mass AS nm, n_tokens AS t, n_steps AS c",
        "token_ledger_steps",
        MASSES,
    )
    row = conn.execute(
        text(f"SELECT SUM(pm), SUM(nm), SUM(t), SUM(c) FROM ({union}) AS u"),
        {"r": run_id, **params},
    ).one()
    return {
        "pos_mass": float(row[0] or 0.0),
        "neg_mass": float(row[1] or 0.0),
        "n_tokens": int(row[2] or 0),
        "n_steps": int(row[3] or 0),
    }


def _id_sums(conn: Connection, run_id: int, pieces: Pieces, tail: str = "") -> list[Any]:
    """(token_id, count, lr_sum, n_steps) of every id stored in the pieces, then ``tail``."""
    union, params = pieces_sql(
        pieces,
        "token_id, count AS c, lr_sum AS s, 1 AS n",
        "token_id, count AS c, lr_sum AS s, n_steps AS n",
        "token_ledger",
        ROLLUPS,
    )
    sql = f"SELECT token_id, SUM(c), SUM(s), SUM(n) FROM ({union}) AS u GROUP BY token_id {tail}"
    return conn.execute(text(sql), {"r": run_id, **params}).all()


def _add_shares(df: pd.DataFrame, pos_mass: float, neg_mass: float) -> None:
    lr = df["lr_sum"].to_numpy()
    df["share_pos"] = np.maximum(lr, 0.0) / pos_mass if pos_mass > 0 else np.nan
    df["share_neg"] = np.minimum(lr, 0.0) / neg_mass if neg_mass < 0 else np.nan


def _window(conn: Connection, run_id: int, lo: int, hi: int) -> tuple[pd.DataFrame, int]:
    """Every stored id of the range (index token_id: count, lr_sum) and its token count."""
    pieces = _pieces(conn, run_id, lo, hi)
    rows = _id_sums(conn, run_id, pieces)
    df = pd.DataFrame(
        {
            "count": np.array([float(r[1]) for r in rows], dtype=np.float64),
            "lr_sum": np.array([float(r[2]) for r in rows], dtype=np.float64),
        },
        index=pd.Index([int(r[0]) for r in rows], dtype=np.int64, name="token_id"),
    )
    return df, _masses(conn, run_id, pieces)["n_tokens"]


def _texts(conn: Connection, run_id: int, ids: Sequence[int]) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join(f":i{j}" for j in range(len(chunk)))
        sql = f"SELECT token_id, text FROM token_vocab WHERE run_id = :r AND token_id IN ({marks})"
        params = {"r": run_id, **{f"i{j}": i for j, i in enumerate(chunk)}}
        for tid, t in conn.execute(text(sql), params):
            out[int(tid)] = t
    return out
