"""log_step's copy of numpy log-probs: the C copy (``monitor.ingest.checked_copy``) and the
numpy path it falls back to give the same arrays and the same errors, field by field."""

from __future__ import annotations

import re

import numpy as np
import pytest

from monitor.errors import InvalidInput
from monitor.ingest import checked_copy
from monitor.ingest.step_input import EMPTY_RESPONSES_METRIC, StepArgs, build_item

PATHS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "c",
        id="c",
        marks=pytest.mark.skipif(checked_copy.extension is None, reason="extension not built"),
    ),
    pytest.param(
        "c-portable",
        id="c-portable",
        marks=pytest.mark.skipif(checked_copy.extension is None, reason="extension not built"),
    ),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Run the test through the numpy path, the C copy, and the C copy's portable loop."""
    monkeypatch.setattr(checked_copy, "ENABLED", request.param != "numpy")
    monkeypatch.setattr(checked_copy, "SIMD", request.param == "c")
    return request.param


def inputs(dtype=np.float32, b: int = 6, t: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (b, t)).astype(dtype)
    ref = np.minimum(lp + rng.normal(0, 0.2, (b, t)), 0.0).astype(dtype)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    rollout = (lp - 0.01).astype(dtype)
    entropies = rng.exponential(1.0, (b, t)).astype(dtype)
    return {"lp": lp, "ref": ref, "mask": mask, "rollout": rollout, "entropies": entropies}


def build(x: dict, check: bool = True, **kw):
    args = StepArgs(
        x["lp"],
        x["ref"],
        x.get("mask"),
        rollout_logprobs=x.get("rollout"),
        entropies=x.get("entropies"),
        **kw,
    )
    return build_item(0, 0.0, args, check_values=check)


def error(x: dict, **kw) -> str:
    with pytest.raises(InvalidInput) as info:
        build(x, **kw)
    return str(info.value)


def both_paths(monkeypatch, fn):
    """fn() through the numpy path and through the C copy."""
    out = []
    for enabled in (False, True):
        monkeypatch.setattr(checked_copy, "ENABLED", enabled)
        out.append(fn())
    return out


needs_c = pytest.mark.skipif(checked_copy.extension is None, reason="extension not built")


# --- the C copy is taken where it applies ---------------------------------------------------


@needs_c
def test_the_common_case_takes_the_c_copy(monkeypatch) -> None:
    calls = []
    real = checked_copy.copy
    monkeypatch.setattr(checked_copy, "copy", lambda *a: calls.append(1) or real(*a))
    x = inputs()
    build(x)
    build({"lp": x["lp"][0], "ref": x["ref"][0]})
    assert len(calls) == 2
    build({**x, "mask": x["mask"].astype(np.int8)})  # 0/1 numbers: the numpy path
    build({**x, "lp": x["lp"].astype(np.float16)})
    build({"lp": x["lp"][0].tolist(), "ref": x["ref"][0]})
    assert len(calls) == 2


class _TensorLike:
    """What usable() sees of a torch tensor: shape and dtype attributes, size a method."""

    def __init__(self, array: np.ndarray) -> None:
        self.shape, self.dtype, self._array = array.shape, array.dtype, array

    def size(self, dim: int | None = None) -> int:
        return self._array.size if dim is None else self._array.shape[dim]


def test_tensors_and_other_array_likes_take_the_numpy_path() -> None:
    """A torch tensor's size is a method: asking for it as numpy's attribute broke every
    TRL step (TypeError), so usable() looks at the type first."""
    x = inputs()
    tensor_like = [_TensorLike(x["lp"]), _TensorLike(x["ref"])]
    assert not checked_copy.usable(tensor_like, None, 1 << 20)
    assert not checked_copy.usable([x["lp"], tensor_like[1]], x["mask"], 1 << 20)
    assert checked_copy.usable([x["lp"], x["ref"]], x["mask"], 1 << 20) == (
        checked_copy.extension is not None
    )


# --- same arrays ------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["c", "strided", "fortran", "reversed", "1d", "no mask"])
def test_the_c_copy_gives_the_numpy_paths_item(monkeypatch, dtype, layout) -> None:
    x = inputs(dtype)
    x["mask"][2] = False  # an empty response: counted in the metric
    if layout == "strided":
        x = {k: np.repeat(v, 2, axis=1)[:, ::2] for k, v in x.items()}
    elif layout == "fortran":
        x = {k: np.asfortranarray(v) for k, v in x.items()}
    elif layout == "reversed":
        x = {k: v[::-1, ::-1] for k, v in x.items()}
    elif layout == "1d":
        x = {k: v[0] for k, v in x.items()}
    elif layout == "no mask":
        x["mask"] = None
    if layout in ("strided", "fortran", "reversed"):
        assert not all(v.flags.c_contiguous for v in x.values() if v is not None and v.ndim == 2)
    numpy_item, c_item = both_paths(monkeypatch, lambda: build(x))
    for name in ("policy_logprobs", "ref_logprobs", "mask"):
        a, b = getattr(numpy_item, name), getattr(c_item, name)
        if a is None:
            assert b is None
            continue
        assert b.dtype == a.dtype and b.shape == a.shape and b.flags.c_contiguous
        np.testing.assert_array_equal(b, a)
        assert not np.shares_memory(b, x["mask" if name == "mask" else "lp"])
    assert numpy_item.extra.keys() == c_item.extra.keys() == {"rollout_logprobs", "entropies"}
    for name, a in numpy_item.extra.items():
        np.testing.assert_array_equal(c_item.extra[name], a)
    assert numpy_item.metrics == c_item.metrics
    # the count rides along in the item: the background skips its own look for empty rows
    want_empty = {"1d": 0, "no mask": None}.get(layout, 1)
    assert numpy_item.empty_rows == c_item.empty_rows == want_empty
    if layout not in ("1d", "no mask"):
        assert c_item.metrics == {EMPTY_RESPONSES_METRIC: 1}


def test_the_copy_is_private(path) -> None:
    x = inputs()
    item = build(x)
    before = item.policy_logprobs.copy()
    x["lp"][:] = 0.5
    x["mask"][:] = False
    np.testing.assert_array_equal(item.policy_logprobs, before)
    assert item.mask.any()


# --- same errors ------------------------------------------------------------------------------


FIELDS = [
    ("lp", "policy_logprobs", "logprob"),
    ("ref", "ref_logprobs", "logprob"),
    ("rollout", "rollout_logprobs", "logprob"),
    ("entropies", "entropies", "entropy"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("key", "name", "kind"), FIELDS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, "out of range"])
def test_a_bad_value_names_its_field_and_first_position(path, dtype, key, name, kind, value):
    x = inputs(dtype)
    if value == "out of range":
        value = 0.5 if kind == "logprob" else -0.5
    x[key][3, 7] = value
    x[key][4, 2] = value  # a later one is not the one named
    x[key][0, -1] = value  # outside the mask: fine
    x["mask"][0, -1] = False
    message = error(x)
    assert message.startswith(f"{name}[3, 7] is ")
    word = {np.inf: "+inf", -np.inf: "-inf"}.get(value, "nan" if value != value else "+0.5")
    assert f" is {word}" in message or (value == -0.5 and " is -0.5" in message)
    assert ("finite" if not np.isfinite(value) else "tolerance") in message


def test_the_first_field_in_order_is_named(path) -> None:
    x = inputs()
    x["entropies"][0, 0] = np.nan
    x["ref"][5, 5] = 1.0
    x["lp"][1, 1] = np.nan
    assert error(x).startswith("policy_logprobs[1, 1] is nan")
    x["lp"][1, 1] = -1.0
    assert error(x).startswith("ref_logprobs[5, 5] is +1:")


def test_the_tolerance_is_compared_in_the_arrays_dtype(path) -> None:
    x = inputs(np.float32)
    x["lp"][1, 1] = np.float32(1e-3)  # the tolerance as float32: fine
    x["entropies"][1, 1] = np.float32(-1e-3)
    build(x)
    x["lp"][1, 1] = np.nextafter(np.float32(1e-3), np.float32(1))
    assert error(x).startswith("policy_logprobs[1, 1] is ")
    x = inputs(np.float64)
    x["lp"][1, 1] = 1e-3
    build(x)
    x["lp"][1, 1] = np.nextafter(1e-3, 1)
    assert error(x).startswith("policy_logprobs[1, 1] is ")


def test_a_1d_sequence_is_named_as_the_caller_indexes_it(path) -> None:
    x = {k: v[0] for k, v in inputs().items()}
    x["mask"][:] = True
    x["ref"][9] = np.inf
    assert error(x).startswith("ref_logprobs[9] is +inf")


def test_bad_values_anywhere_outside_the_mask_are_fine(path) -> None:
    x = inputs()
    for key in ("lp", "ref", "rollout", "entropies"):
        x[key][~x["mask"]] = np.nan
    item = build(x)
    assert np.isnan(item.policy_logprobs[~x["mask"]]).all()


def test_unchecked_values_are_copied_as_they_are(path) -> None:
    x = inputs()
    x["lp"][0, 0] = np.nan
    item = build(x, check=False)
    assert np.isnan(item.policy_logprobs[0, 0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x: {**x, "ref": x["ref"][:, :-1]}, r"ref_logprobs has shape \(6, 39\)"),
        (lambda x: {**x, "mask": x["mask"][:-1]}, r"mask has shape \(5, 40\)"),
        (lambda x: {**x, "entropies": x["entropies"][:, 1:]}, "entropies has shape"),
        (lambda x: {**x, "rollout": x["rollout"][:3]}, "rollout_logprobs has shape"),
        (lambda x: {**x, "mask": np.zeros_like(x["mask"])}, "every one of the 6 sequences"),
        (lambda x: {"lp": x["lp"][:, :0], "ref": x["ref"][:, :0]}, "empty batch"),
    ],
)
def test_shape_and_mask_errors_are_those_of_the_numpy_path(monkeypatch, change, message) -> None:
    x = change(inputs())
    messages = both_paths(monkeypatch, lambda: error(x))
    assert messages[0] == messages[1]
    assert re.search(message, messages[0])
