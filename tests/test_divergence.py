"""monitor.divergence: the KL quantities (docs/ARCHITECTURE.md), their input checks and merge."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from monitor import divergence
from monitor.divergence import (
    HIST_EDGES,
    LOGPROB_TOLERANCE,
    StepSummary,
    merge_partials,
    partials,
    sequence_kl,
    summarize,
)
from monitor.divergence import _compiled as compiled
from monitor.divergence import _numpy_kernel as numpy_kernel
from monitor.divergence import _passes as passes
from monitor.errors import InvalidInput

SCALARS = [
    "kl_mean",
    "kl_std",
    "kl_min",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_p99",
    "kl_max",
    "k1",
    "k2",
    "k3",
    "neg_kl_frac",
    "top1pct_share",
    "resp_len_mean",
    "policy_nll",
    "entropy_mean",
    "reward_mean",
    "reward_std",
    "kl_coef",
    "rollout_gap",
    "n_sequences",
    "n_tokens",
    "vocab_top_share",
]


KERNELS = ["compiled-avx2", "compiled-scalar", "numpy"]


@pytest.fixture(autouse=True, params=KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on each token kernel: the C pass with its AVX2 loop, the C pass with its
    scalar loop, and the numpy fallback of installs built without a C compiler."""
    if request.param == "numpy":
        monkeypatch.setattr(compiled, "extension", None)
    elif compiled.extension is None:
        pytest.skip("monitor._kernel was not built (no C compiler at install time)")
    elif request.param == "compiled-scalar":
        monkeypatch.setattr(compiled, "SIMD", False)
    return str(request.param)


def test_kernel_names_the_pass_in_use(kernel: str) -> None:
    name = divergence.kernel()
    if kernel == "compiled-avx2":
        assert name == ("c-avx2" if compiled.extension.has_avx2() else "c-scalar")
    else:
        assert name == {"compiled-scalar": "c-scalar", "numpy": "numpy"}[kernel]


def test_compiled_kernel_is_built_where_a_compiler_is() -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the numpy kernel is the expected one")
    import monitor

    try:
        importlib.import_module("monitor._kernel")
    except ImportError as exc:
        pytest.fail(
            f"monitor._kernel is not built next to {monitor.__file__} ({exc}): setup.py did not "
            "build it, or a source tree without a build is imported (python -m pytest puts the "
            "cwd first; use the venv's pytest, or pip install -e . to build in place)"
        )


def test_named_sums_cover_every_sum_of_the_compiled_pass(kernel: str) -> None:
    """compiled.Sums names the C pass's sums in order: one name per sum, none left unnamed."""
    if kernel != "compiled-avx2":
        pytest.skip("one run is enough")
    assert len(compiled.Sums._fields) == compiled.extension.N_SUMS
    per_range = np.arange(2 * compiled.extension.N_SUMS, dtype=float).reshape(2, -1)
    total = compiled.Sums.total(per_range)
    assert total.sum_pos_l == per_range[:, 4].sum() and total.n_tokens == per_range[:, 7].sum()


def batch(
    b: int = 12, t: int = 40, seed: int = 0, scale: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 log-probs (B, T) with a mask of variable response lengths (>= 1 token)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    p = -rng.gamma(0.7, 1.0, (b, t))
    q = np.minimum(p - scale * rng.standard_t(3, (b, t)), 0.0)
    return p, q, mask


def reference(p: np.ndarray, q: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """The definitions of docs/ARCHITECTURE.md written plainly, in float64 with exact summation."""
    rows = [np.asarray(p[i][mask[i]] - q[i][mask[i]], dtype=np.float64) for i in range(len(p))]
    seq = np.array([math.fsum(r) for r in rows])
    lt = np.concatenate(rows)
    n = len(lt)
    top = np.sort(lt)[::-1][: math.ceil(0.01 * n)]
    pos = math.fsum(lt[lt > 0])
    return {
        "seq_kl": seq,
        "kl_mean": seq.mean(),
        "kl_std": seq.std(),
        "kl_min": seq.min(),
        "kl_max": seq.max(),
        "kl_p50": np.quantile(seq, 0.5),
        "k1": math.fsum(lt) / n,
        "k2": math.fsum(lt * lt / 2) / n,
        "k3": math.fsum(k3_terms(lt)) / n,
        "neg_kl_frac": np.mean(seq < 0),
        "top1pct_share": math.fsum(top[top > 0]) / pos if pos > 0 else 0.0,
        "resp_len_mean": n / len(p),
        "policy_nll": -math.fsum(np.asarray(p, np.float64)[mask]) / n,
        "n_tokens": n,
        "hist": np.histogram(np.clip(lt, -10, np.nextafter(10, 0)), HIST_EDGES)[0],
    }


def assert_matches_reference(s: StepSummary, ref: dict[str, Any], rtol: float) -> None:
    for name, want in ref.items():
        if name == "hist":
            np.testing.assert_array_equal(s.token_hist, want)
        elif name == "seq_kl":
            np.testing.assert_allclose(s.seq_kl, want, rtol=rtol, atol=rtol)
        else:
            assert getattr(s, name) == pytest.approx(want, rel=rtol, abs=rtol), name


# --- definitions -----------------------------------------------------------------------------


def test_seed_example_good_day() -> None:
    s = summarize([[-0.8, -0.4]], [[-1.5, -2.1]])
    assert s.seq_kl.tolist() == pytest.approx([2.4])
    assert s.kl_mean == pytest.approx(2.4)
    assert s.k1 == pytest.approx(1.2)
    assert s.k2 == pytest.approx((0.7**2 + 1.7**2) / 4)
    assert s.k3 == pytest.approx((math.expm1(-0.7) + 0.7 + math.expm1(-1.7) + 1.7) / 2)
    assert s.policy_nll == pytest.approx(0.6)
    assert (s.n_sequences, s.n_tokens, s.resp_len_mean) == (1, 2, 2.0)
    assert sequence_kl([-0.8, -0.4], [-1.5, -2.1]).tolist() == pytest.approx([2.4])
    assert math.exp(s.kl_mean) == pytest.approx(11.02, abs=0.01)


def test_matches_plain_definitions() -> None:
    p, q, mask = batch(b=30, t=64, seed=1)
    assert_matches_reference(summarize(p, q, mask), reference(p, q, mask), rtol=1e-9)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many row chunks even for small test batches."""
    monkeypatch.setattr(numpy_kernel, "CHUNK_POSITIONS", 2048)


@pytest.mark.usefixtures("small_chunks")
def test_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    p, q, mask = batch(b=70, t=700, seed=2)
    s = summarize(p, q, mask)
    assert_matches_reference(s, reference(p, q, mask), rtol=1e-9)
    again = summarize(p, q, mask)
    assert again.as_dict() == s.as_dict()  # deterministic
    monkeypatch.setattr(numpy_kernel, "CHUNK_POSITIONS", 1 << 20)
    one_chunk = summarize(p, q, mask)
    assert_close_summaries(one_chunk, s, rtol=1e-12)
    np.testing.assert_array_equal(one_chunk.token_hist, s.token_hist)


def test_long_sequences_and_odd_sizes() -> None:
    p, q, mask = batch(b=3, t=30_001, seed=13)
    assert_matches_reference(summarize(p, q, mask), reference(p, q, mask), rtol=1e-9)


@pytest.mark.parametrize(
    ("scale", "shift"),
    [
        (0.01, 0.0),  # no token beyond 1/2: the top 1% comes from below the tail
        (0.02, 0.3),  # few beyond 1/2, enough in [1/4, 1/2)
        (0.3, 2.0),  # nearly every token beyond 1/2 and positive: more than the first buffer
        (0.3, -2.0),  # nearly every token beyond -1/2: negative KL, a tiny positive share
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_regimes_of_l_and_threads(
    scale: float, shift: float, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path of the top-1% search and of the tail handling, on one and on two threads
    (the batch is split between them whatever its size here)."""
    monkeypatch.setattr(passes, "PARALLEL_MIN_POSITIONS", 0 if threads == 2 else 1 << 60)
    monkeypatch.setattr(numpy_kernel, "CHUNK_POSITIONS", 4096)  # several numpy chunks too
    rng = np.random.default_rng(17)
    b, t = 40, 257
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, b)[:, None]
    p = -rng.gamma(0.7, 3.0, (b, t))
    q = np.minimum(p - shift - scale * rng.standard_t(3, (b, t)), 0.0)
    s = summarize(p, q, mask)
    assert_matches_reference(s, reference(p, q, mask), rtol=1e-9)
    assert_close_summaries(summarize(p.astype(np.float32), q.astype(np.float32), mask),
                           summarize(p.astype(np.float32).astype(np.float64),
                                     q.astype(np.float32).astype(np.float64), mask),
                           rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(("dtype", "bound"), [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_k3_polynomial_matches_its_function(dtype: type, bound: float) -> None:
    """k3 of |l| < 1/2 comes from a polynomial for g(l) = (exp(-l) - 1 + l) / l^2; its
    relative error bounds the error of k3 there."""
    x = np.linspace(-0.5, 0.5, 20_001)
    exact = sum((-x) ** n / math.factorial(n + 2) for n in range(30))
    approx = np.polynomial.polynomial.polyval(x, passes.K3_POLY[np.dtype(dtype)])
    assert np.max(np.abs(approx - exact) / exact) < bound


def test_k1_k2_k3_converge_to_analytic_values() -> None:
    rng = np.random.default_rng(7)
    k = 50
    logp = np.log(rng.dirichlet(np.ones(k)))
    logq = np.log(rng.dirichlet(np.ones(k)))
    ratio = logp - logq
    prob = np.exp(logp)
    kl = float(prob @ ratio)  # KL(p || q)
    half_m2 = float(prob @ ratio**2) / 2
    tokens = rng.choice(k, size=(200, 1000), p=prob)
    s = summarize(logp[tokens], logq[tokens])
    n = tokens.size
    lt = ratio[tokens].ravel()
    k3_per_token = np.expm1(-lt) + lt
    # tolerance: 5 standard errors from the analytic variance of each estimator
    se_k1 = math.sqrt(prob @ (ratio - kl) ** 2 / n)
    se_k2 = math.sqrt(prob @ (ratio**2 / 2 - half_m2) ** 2 / n)
    se_k3 = math.sqrt(prob @ (np.expm1(-ratio) + ratio - kl) ** 2 / n)
    assert abs(s.k1 - kl) < 5 * se_k1
    assert abs(s.k3 - kl) < 5 * se_k3
    assert abs(s.k2 - half_m2) < 5 * se_k2
    # and the sample quantities are the plain means of the per-token estimators
    assert s.k3 == pytest.approx(k3_per_token.mean(), rel=1e-9)
    assert s.k1 == pytest.approx(lt.mean(), rel=1e-9)


logprob_values = st.floats(-30.0, 0.0, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64, st.tuples(st.integers(1, 6), st.integers(1, 30)), elements=logprob_values
    ),
    st.data(),
)
def test_k2_k3_nonnegative_and_k3_exact(p: np.ndarray, data: st.DataObject) -> None:
    # l spans tiny (1e-12), moderate and large values of both signs
    shift = data.draw(
        hnp.arrays(
            np.float64,
            p.shape,
            elements=st.sampled_from([0.0, 1e-12, -1e-9, 3e-5, -0.2, 0.49, -0.51, 2.0, -8.0]),
        )
    )
    q = np.minimum(p - shift, 0.0)
    s = summarize(p, q)
    assert s.k2 >= 0 and s.k3 >= 0
    lt = (p - q).ravel()
    exact = math.fsum(k3_terms(lt)) / lt.size
    assert s.k3 == pytest.approx(exact, rel=1e-7, abs=1e-300)


@pytest.mark.parametrize("lv", [0.5, -0.5, 0.75, -1.0, 3.0, -9.5, 40.0, -100.0, 700.0, -700.0])
def test_k3_of_tail_values_to_full_precision(lv: float) -> None:
    """Tail tokens (|l| >= 1/2) take exp(-l) - 1 + l exactly (the compiled pass has its own
    vectorised exp): compare with libm on a batch wide enough for the vector loop."""
    t = 11  # 8 tokens through the vector loop, 3 through the scalar remainder
    q = np.full((2, t), -800.0) if lv > 0 else np.full((2, t), -0.25)
    p = q + lv
    s = summarize(p, q)
    want = math.expm1(-lv) + lv
    assert s.k3 == pytest.approx(want, rel=1e-13)
    assert s.kl_mean == pytest.approx(t * lv, rel=1e-13)


def test_k3_exact_when_tail_and_central_tokens_mix() -> None:
    """Groups of four holding 0 to 4 tail tokens (the compiled pass switches between libm's
    exp and a vector exp by how many) agree with libm to 1e-12 overall."""
    rng = np.random.default_rng(3)
    lt = rng.uniform(-40.0, 40.0, (6, 67))
    lt[rng.random(lt.shape) < 0.4] *= 0.01  # some central tokens in every group
    q = np.where(lt > 0, -50.0, -0.25)
    s = summarize(q + lt, q)
    assert s.k3 == pytest.approx(math.fsum(k3_terms(lt.ravel())) / lt.size, rel=1e-12)


def k3_terms(lt: np.ndarray) -> np.ndarray:
    """exp(-l) - 1 + l to full precision: expm1(-l) + l loses digits when |l| is tiny, so
    small values take 14 terms of the Taylor series instead."""
    series = sum((-lt) ** n / math.factorial(n) for n in range(14, 1, -1))
    return np.where(np.abs(lt) < 0.1, series, np.expm1(-lt) + lt)


def test_histogram_bins_ends_and_edges() -> None:
    lt = np.array([-50.0, -10.0, -0.25, -1e-9, 0.0, 0.25, 9.99, 10.0, 400.0])
    s = summarize((lt.clip(max=0))[None, :], (-lt.clip(min=0))[None, :])
    h = s.token_hist
    assert h.sum() == s.n_tokens == len(lt)
    assert len(HIST_EDGES) == 81 and len(h) == 80
    assert h[0] == 2  # -50 and -10
    assert h[39] == 2  # -0.25 and -1e-9 in [-0.25, 0)
    assert h[40] == 1  # 0.0 in [0, 0.25)
    assert h[41] == 1  # 0.25 opens the next bin
    assert h[79] == 3  # 9.99, 10 and beyond


def test_top1pct_share() -> None:
    # 200 tokens: top ceil(2) tokens are 5 and 3; positive sum 5 + 3 + 198 * 0.01
    lt = np.concatenate([[5.0, 3.0], np.full(198, 0.01)])
    s = summarize(np.zeros((1, 200)), -lt[None, :])
    assert s.top1pct_share == pytest.approx(8.0 / (8.0 + 1.98))
    none_positive = summarize(np.full((2, 3), -2.0), np.full((2, 3), -1.0))
    assert none_positive.top1pct_share == 0.0
    assert none_positive.neg_kl_frac == 1.0


def test_optional_quantities() -> None:
    p, q, mask = batch(b=5, t=9, seed=3)
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=5)
    ent = rng.gamma(1.0, 1.0, p.shape)
    rollout = np.minimum(p + rng.normal(0, 0.01, p.shape), 0)
    s = summarize(
        p, q, mask, rewards=rewards, kl_coef=0.05, rollout_logprobs=rollout, entropies=ent
    )
    assert s.reward_mean == pytest.approx(rewards.mean())
    assert s.reward_std == pytest.approx(rewards.std())
    assert s.kl_coef == 0.05
    assert s.entropy_mean == pytest.approx(ent[mask].mean())
    assert s.rollout_gap == pytest.approx((rollout - p)[mask].mean())
    bare = summarize(p, q, mask)
    assert [bare.entropy_mean, bare.reward_mean, bare.reward_std, bare.kl_coef] == [None] * 4
    assert bare.rollout_gap is None


def test_as_dict_has_exactly_the_scalar_columns() -> None:
    p, q, mask = batch()
    extras = {"entropies": np.ones_like(p), "rollout_logprobs": p}
    ids = np.arange(p.size).reshape(p.shape) % 7
    d = summarize(p, q, mask, rewards=np.zeros(12), kl_coef=0.1, token_ids=ids, **extras).as_dict()
    assert list(d) == SCALARS
    for name, v in d.items():
        assert type(v) is (int if name.startswith("n_") else float), name
    json.dumps(d)


# --- input forms ----------------------------------------------------------------------------


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("fill", [np.nan, 7.0, np.inf, -np.inf, 1.0])
def test_masked_values_and_padding_width_do_not_matter(fill: float) -> None:
    p, q, mask = batch(b=9, t=30, seed=4)
    base = summarize(p, q, mask)
    wide = 57
    pw = np.full((9, wide), fill)
    qw = np.full((9, wide), fill)
    mw = np.zeros((9, wide), bool)
    pw[:, 5:35], qw[:, 5:35], mw[:, 5:35] = p, q, mask  # shifted right: left padding
    pw[:, 5:35][~mask] = fill
    qw[:, 5:35][~mask] = fill
    s = summarize(pw, qw, mw)
    assert_close_summaries(s, base, rtol=1e-12)
    np.testing.assert_array_equal(s.token_hist, base.token_hist)


def assert_close_summaries(a: StepSummary, b: StepSummary, rtol: float) -> None:
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        if da[k] is None or db[k] is None:
            assert da[k] is db[k] is None, k
        else:
            assert da[k] == pytest.approx(db[k], rel=rtol, abs=rtol), k
    np.testing.assert_allclose(a.seq_kl, b.seq_kl, rtol=rtol, atol=rtol)


def test_ragged_list_equals_padded_array() -> None:
    p, q, mask = batch(b=8, t=25, seed=5)
    lengths = mask.sum(axis=1)
    plist = [p[i, : lengths[i]] for i in range(8)]
    qlist = [list(q[i, : lengths[i]]) for i in range(8)]
    s = summarize(plist, qlist)
    assert_close_summaries(s, summarize(p, q, mask), rtol=1e-12)
    masked = summarize(plist, qlist, mask=[np.ones(n, bool) for n in lengths])
    assert_close_summaries(masked, s, rtol=0)


def test_mask_as_numbers_and_one_dim_input() -> None:
    p, q, mask = batch(b=4, t=10, seed=6)
    assert_close_summaries(summarize(p, q, mask.astype(np.int64)), summarize(p, q, mask), 0)
    assert_close_summaries(summarize(p, q, mask.astype(np.float32)), summarize(p, q, mask), 0)
    one = summarize(p[0], q[0])
    assert one.n_sequences == 1 and one.n_tokens == 10


def bf16() -> Any:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed: no bfloat16")
    return ml_dtypes.bfloat16


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [("float64", 1e-12), ("float32", 1e-5), ("float16", 1e-5), ("bfloat16", 1e-5)],
)
def test_dtypes_agree(dtype: str, rtol: float) -> None:
    dt = bf16() if dtype == "bfloat16" else np.dtype(dtype)
    p, q, mask = batch(b=10, t=50, seed=8, scale=0.3)
    p, q = p.clip(min=-30), q.clip(min=-30)  # inside float16 range
    pd, qd = p.astype(dt), q.astype(dt)
    s = summarize(pd, qd, mask)
    # against the exact quantities of the same (rounded) numbers
    exact = summarize(pd.astype(np.float64), qd.astype(np.float64), mask)
    assert_close_summaries(s, exact, rtol=rtol)
    # and against the float64 originals, within the rounding of the dtype itself
    eps = float(np.finfo(np.float16).eps) if dtype in ("float16", "bfloat16") else 1e-6
    if dtype == "bfloat16":
        eps = 2.0**-8
    orig = summarize(p, q, mask)
    assert s.kl_mean == pytest.approx(orig.kl_mean, abs=60 * eps * float(np.abs(p).max()))
    assert s.k3 == pytest.approx(orig.k3, rel=0.1 if eps > 1e-3 else 1e-4)


class FakeTensor:
    """Just enough of torch.Tensor: detach/cpu/numpy/float and a dtype attribute."""

    def __init__(self, data: np.ndarray, dtype: str) -> None:
        self.data, self.dtype = data, dtype

    def detach(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return self

    def float(self) -> FakeTensor:
        return FakeTensor(self.data.astype(np.float32), "torch.float32")

    def numpy(self) -> np.ndarray:
        if self.dtype == "torch.bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.data


def test_duck_typed_tensors_including_bfloat16() -> None:
    p, q, mask = batch(b=6, t=20, seed=9)
    want = summarize(p.astype(np.float32), q.astype(np.float32), mask)
    s = summarize(
        FakeTensor(p.astype(np.float32), "torch.float32"),
        FakeTensor(q.astype(np.float32), "torch.bfloat16"),
        FakeTensor(mask, "torch.bool"),
    )
    assert_close_summaries(s, want, rtol=1e-12)
    s_list = summarize([FakeTensor(p[i, :3], "torch.float64") for i in range(6)], list(q[:, :3]))
    assert s_list.n_tokens == 18


def test_no_torch_import() -> None:
    code = (
        "import sys, numpy as np\n"
        "from monitor.divergence import summarize\n"
        "summarize(np.full((2, 3), -1.0), np.full((2, 3), -2.0))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- bad input ------------------------------------------------------------------------------


def _bad(**changes: Any) -> dict[str, Any]:
    p, q, mask = batch(b=5, t=8, seed=10)
    mask[:, :3] = True
    args: dict[str, Any] = {"policy_logprobs": p, "ref_logprobs": q, "mask": mask}
    for k, v in changes.items():
        args[k] = v(args) if callable(v) else v
    return args


def _set(name: str, pos: tuple[int, int], value: float) -> Any:
    def f(args: dict[str, Any]) -> np.ndarray:
        a = np.array(args[name], dtype=np.float64)
        a[pos] = value
        return a

    return f


BAD_CASES = [
    ({"ref_logprobs": np.zeros((5, 7))}, ["ref_logprobs", "(5, 7)", "(5, 8)"]),
    ({"mask": np.ones((4, 8), bool)}, ["mask", "(4, 8)", "(5, 8)"]),
    (
        {"policy_logprobs": _set("policy_logprobs", (3, 1), np.nan)},
        ["policy_logprobs[3, 1]", "nan"],
    ),
    ({"ref_logprobs": _set("ref_logprobs", (2, 2), -np.inf)}, ["ref_logprobs[2, 2]", "-inf"]),
    ({"ref_logprobs": _set("ref_logprobs", (3, 2), 0.42)}, ["ref_logprobs[3, 2] is +0.42", "<= 0"]),
    (
        {"policy_logprobs": _set("policy_logprobs", (0, 0), 2e-3)},
        ["policy_logprobs[0, 0]", "0.002"],
    ),
    (
        {"mask": lambda a: np.where(np.arange(5)[:, None] == 4, False, a["mask"])},
        ["sequence 4 has no response tokens", "'no data', not 0"],
    ),
    (
        {"policy_logprobs": np.zeros((0, 8)), "ref_logprobs": np.zeros((0, 8)), "mask": None},
        ["empty"],
    ),
    ({"rewards": np.zeros(4)}, ["rewards", "(4,)", "5 sequences"]),
    ({"rewards": np.array([0, 1, np.nan, 0, 0])}, ["rewards[2]", "nan"]),
    ({"policy_logprobs": np.full((5, 8), "x")}, ["policy_logprobs", "dtype"]),
    ({"mask": lambda a: a["mask"].astype(float) * 0.5}, ["mask[0, 0]", "0.5"]),
    (
        {"entropies": _set("policy_logprobs", (1, 1), 0.5)},
        ["entropies[0, 0]", "entropy must be >= 0"],
    ),
    (
        {"rollout_logprobs": _set("policy_logprobs", (1, 2), 0.7)},
        ["rollout_logprobs[1, 2]", "+0.7"],
    ),
    ({"kl_coef": float("nan")}, ["kl_coef"]),
]


@pytest.mark.parametrize(("changes", "needles"), BAD_CASES)
def test_bad_input_names_argument_and_position(changes: dict[str, Any], needles: list[str]) -> None:
    args = _bad(**changes)
    with pytest.raises(InvalidInput) as info:
        summarize(**args)
    for needle in needles:
        assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.usefixtures("small_chunks")
def test_first_offender_in_row_major_order_over_many_chunks() -> None:
    p, q, mask = batch(b=300, t=200, seed=11)
    p[250, 3] = np.nan
    q[120, 7] = 0.5  # an earlier row, but policy_logprobs is checked first...
    p[200, 0] = np.inf
    mask[[120, 200, 250], :8] = True
    with pytest.raises(InvalidInput, match=r"policy_logprobs\[200, 0\] is \+inf"):
        summarize(p, q, mask)
    p[[200, 250]] = -1.0
    with pytest.raises(InvalidInput, match=r"ref_logprobs\[120, 7\] is \+0\.5"):
        summarize(p, q, mask)


def test_ragged_errors() -> None:
    with pytest.raises(
        InvalidInput, match=r"ref_logprobs\[1\] has 2 tokens but policy_logprobs\[1\]"
    ):
        summarize([[-1.0], [-1.0, -2.0, -3.0]], [[-1.0], [-1.0, -2.0]])
    with pytest.raises(InvalidInput, match=r"policy_logprobs\[1\]\[2\] is nan"):
        summarize([[-1.0], [-1.0, -2.0, np.nan]], [[-1.0], [-1.0, -2.0, -3.0]])
    with pytest.raises(InvalidInput, match="sequence 1 has no response tokens"):
        summarize([[-1.0], []], [[-1.0], []])


def test_tolerance_for_rounding_near_zero() -> None:
    p = np.array([[LOGPROB_TOLERANCE / 2, -1.0]])
    assert summarize(p, np.array([[-0.5, -1.0]])).n_tokens == 2


# --- merging shards -------------------------------------------------------------------------


def test_merge_partials_equals_whole_batch() -> None:
    p, q, mask = batch(b=41, t=300, seed=12)
    rng = np.random.default_rng(12)
    rewards = rng.normal(size=41)
    ent = rng.gamma(1.0, 1.0, p.shape)
    whole = summarize(p, q, mask, rewards=rewards, kl_coef=0.02, entropies=ent)
    cuts = [0, 7, 30, 41]
    shards = [
        json.loads(
            json.dumps(
                partials(
                    p[a:b],
                    q[a:b],
                    mask[a:b],
                    rewards=rewards[a:b],
                    kl_coef=0.02,
                    entropies=ent[a:b],
                )
            )
        )
        for a, b in itertools.pairwise(cuts)
    ]
    merged = merge_partials(shards)
    dm, dw = merged.as_dict(), whole.as_dict()
    for k in SCALARS:
        if k == "top1pct_share":
            assert dm[k] <= dw[k] + 1e-12
        elif k in ("k1", "k2", "k3", "policy_nll", "entropy_mean", "reward_mean", "reward_std"):
            assert dm[k] == pytest.approx(dw[k], rel=1e-12), k
        else:
            assert dm[k] == dw[k], k  # quantiles, counts, fractions: exact
    np.testing.assert_array_equal(merged.seq_kl, whole.seq_kl)
    np.testing.assert_array_equal(merged.token_hist, whole.token_hist)
    assert merge_partials(shards, kl_coef=0.5).kl_coef == 0.5


def test_merge_top_share_is_exact_when_shards_are_alike_and_under_otherwise() -> None:
    l_small = np.full((1, 300), 0.01)
    l_big = np.concatenate([np.full(6, 4.0), np.full(294, 0.01)])[None, :]
    # one shard holds all 6 top tokens but only keeps its own top ceil(3) of them
    whole = summarize(np.zeros((2, 300)), -np.vstack([l_small, l_big]))
    merged = merge_partials(
        [partials(np.zeros((1, 300)), -l_small), partials(np.zeros((1, 300)), -l_big)]
    )
    assert merged.top1pct_share < whole.top1pct_share
    alike = merge_partials([partials(np.zeros((1, 300)), -l_big)] * 2)
    assert alike.top1pct_share == pytest.approx(
        summarize(np.zeros((2, 300)), -np.vstack([l_big, l_big])).top1pct_share
    )


def test_merge_rejects_garbage() -> None:
    with pytest.raises(InvalidInput, match="list_of_partials is empty"):
        merge_partials([])
    with pytest.raises(InvalidInput, match=r"list_of_partials\[0\] is not a klmon partial"):
        merge_partials([{"seq_kl": [1.0]}])
    good = partials(np.zeros((1, 3)), np.full((1, 3), -1.0))
    with pytest.raises(InvalidInput, match="rewards were given for some shards"):
        merge_partials([good, partials(np.zeros((1, 3)), np.full((1, 3), -1.0), rewards=[1.0])])


def _top_values(p: np.ndarray, q: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ceil(1% n_tokens) largest positive l, largest first, by sorting every l."""
    lt = (p - q)[mask]
    top = np.sort(lt)[::-1][: math.ceil(0.01 * len(lt))]
    return top[top > 0]


@pytest.mark.parametrize(
    "order",
    [
        "normal-0.1",  # healthy: no token in the tail, the level rises from 0 to the top 1%
        "normal-0.001",  # tiny KL
        "ascending",  # every token beats the level: the most compactions there can be
        "descending",  # the top 1% first, then nothing beats the level
        "ties",  # a few distinct values, the k-th largest shared by many tokens
        "few-positive",  # fewer positive l than the top 1% holds
        "equal",  # no l beats the sampled level: the batch is read again
        "one-range",  # the whole top in the first half of the rows (one range of two)
    ],
)
@pytest.mark.parametrize("room", [1, 4])  # 4: compactions from a sampled level too
@pytest.mark.parametrize("threads", [1, 2])
def test_top_candidates_are_exactly_the_largest_positive_l(
    order: str, room: float, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top-1% candidates kept in the token pass (compacted whenever their buffer fills; a
    room of 1 compacts on nearly every token that beats the level) are the largest positive
    l of the batch, value for value, on one thread and on two."""
    monkeypatch.setattr(compiled, "CANDIDATE_ROOM", room)
    monkeypatch.setattr(passes, "PARALLEL_MIN_POSITIONS", 0 if threads == 2 else 1 << 60)
    rng = np.random.default_rng(8)
    b, t = 80, 301  # enough tokens for a buffer of 4 x 1% to be compacted from a sample
    n = b * t
    lt = {
        "normal-0.1": lambda: 0.1 * rng.standard_normal(n),
        "normal-0.001": lambda: 0.001 * rng.standard_normal(n),
        "ascending": lambda: np.linspace(-0.3, 0.6, n),
        "descending": lambda: np.linspace(0.6, -0.3, n),
        "ties": lambda: rng.choice(
            [-0.5, -0.125, 0.0, 0.125, 0.25, 0.75], n, p=[0.2] * 4 + [0.195, 0.005]
        ),
        "few-positive": lambda: np.where(rng.random(n) < 0.003, 0.2, -0.1) * rng.random(n),
        "equal": lambda: np.full(n, 0.3),
        "one-range": lambda: np.where(
            np.arange(n) < n // 2, rng.exponential(0.5, n), 0.05 * rng.standard_normal(n)
        ),
    }[order]().reshape(b, t)
    mask = np.arange(t)[None, :] < rng.integers(t // 2, t + 1, b)[:, None]
    p = np.minimum(lt, 0.0) - rng.gamma(0.7, 1.0, (b, t))
    q = p - lt
    want = _top_values(p, q, mask)
    got = np.asarray(partials(p, q, mask)["top_pos_l"])
    np.testing.assert_array_equal(got, want)
    s = summarize(p, q, mask)
    assert s.top1pct_share == pytest.approx(reference(p, q, mask)["top1pct_share"], rel=1e-12)


class _CountedKernel:
    """``monitor._kernel`` with its token passes recorded: the level each row range started
    its candidates at."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self.starts: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)

    def stats(self, *args: Any) -> Any:
        self.starts.append(args[11])
        return self._kernel.stats(*args)


def test_a_top_in_one_row_range_is_found_in_one_read(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drifted run's top often lies in a few sequences, all in one row range: the sampled
    level is the whole batch's, so that range keeps all of the top on the first read (a level
    per range would have been that range's own top and read the batch twice)."""
    if kernel == "numpy":
        pytest.skip("the compiled pass's reads")
    counted = _CountedKernel(compiled.extension)
    monkeypatch.setattr(compiled, "extension", counted)
    monkeypatch.setattr(passes, "PARALLEL_MIN_POSITIONS", 0)
    rng = np.random.default_rng(5)
    b, t = 64, 2048
    lt = 0.05 * rng.standard_normal((b, t))
    lt[: b // 2] = rng.exponential(0.5, (b // 2, t))  # all of the top in the first range
    p = np.minimum(lt, 0.0) - rng.gamma(0.7, 1.0, (b, t))
    mask = np.ones((b, t), dtype=bool)
    got = partials(p, p - lt, mask, threads=1)
    assert len(counted.starts) == 2 and counted.starts[0] == counted.starts[1] > 0  # 2 ranges
    np.testing.assert_array_equal(got["top_pos_l"], _top_values(p, p - lt, mask))


def test_a_sampled_level_that_leaves_out_part_of_the_top_is_read_again_from_0(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every l equal: none beats the sampled level (only values above it are kept), so the
    batch is read a second time from 0, and the top is exact."""
    if kernel == "numpy":
        pytest.skip("the compiled pass's reads")
    counted = _CountedKernel(compiled.extension)
    monkeypatch.setattr(compiled, "extension", counted)
    b, t = 64, 2048  # two row ranges
    p = np.full((b, t), -1.0)
    q = p - 0.3
    got = partials(p, q, threads=1)
    level = (p - q)[0, 0]
    assert counted.starts == [level, level, 0.0, 0.0]
    np.testing.assert_array_equal(got["top_pos_l"], np.full(math.ceil(0.01 * b * t), level))


# --- threads --------------------------------------------------------------------------------


def _two_range_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Large enough that summarize splits it between two threads."""
    rows = -(-passes.PARALLEL_MIN_POSITIONS // 512) + 2
    return batch(b=rows, t=512, seed=21)


def test_concurrent_callers_get_the_same_results() -> None:
    import concurrent.futures

    p, q, mask = _two_range_batch()
    want = summarize(p, q, mask)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: summarize(p, q, mask), range(8)))
    for s in got:
        assert s.as_dict() == want.as_dict()
        np.testing.assert_array_equal(s.token_hist, want.token_hist)


def test_one_thread_gives_the_same_results_bit_for_bit() -> None:
    """``threads=1`` runs the same row ranges on the caller's thread alone: the sums add up
    in the same order, so every quantity (and the ledger) is identical, not just close."""
    p, q, mask = _two_range_batch()
    ids = np.random.default_rng(3).integers(0, 50_000, p.shape)
    want = summarize(p, q, mask, token_ids=ids)
    got = summarize(p, q, mask, token_ids=ids, threads=1)
    assert got.as_dict() == want.as_dict()
    np.testing.assert_array_equal(got.seq_kl, want.seq_kl)
    np.testing.assert_array_equal(got.token_hist, want.token_hist)
    assert want.ledger is not None and got.ledger is not None
    np.testing.assert_array_equal(got.ledger.lr_sums, want.ledger.lr_sums)
    assert partials(p, q, mask, threads=1) == partials(p, q, mask)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(threads: object) -> None:
    p, q, mask = batch(b=2, t=8, seed=1)
    with pytest.raises(InvalidInput, match="threads must be an integer >= 1"):
        summarize(p, q, mask, threads=threads)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="threads must be an integer >= 1"):
        partials(p, q, mask, threads=threads)  # type: ignore[arg-type]


def test_summarize_in_a_forked_child_does_not_hang() -> None:
    """The helper thread does not survive fork(); the child must start its own."""
    import multiprocessing

    p, q, mask = _two_range_batch()
    want = summarize(p, q, mask).kl_mean  # the parent's helper thread exists now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_kl_mean, (p, q, mask)).get(timeout=60)
    assert got == want


def _child_kl_mean(p: np.ndarray, q: np.ndarray, mask: np.ndarray) -> float:
    return summarize(p, q, mask).kl_mean


# --- found by differential fuzzing of the kernels ---------------------------------------------


def test_float32_value_at_the_tolerance_is_accepted_alike() -> None:
    p, q = np.float32([[1e-3, -1.0]]), np.float32([[-0.5, -1.0]])
    s = summarize(p, q, entropies=np.float32([[-1e-3, 0.0]]))
    assert s.k1 == pytest.approx((float(np.float32(1e-3)) + 0.5) / 2)


@pytest.mark.parametrize("where", ["policy_logprobs", "rollout_logprobs", "entropies"])
def test_finite_values_whose_sum_overflows_are_refused(where: str) -> None:
    big = np.array([[-1e308, -1e308]])
    args: dict[str, Any] = {"policy_logprobs": np.array([[-1.0, -1.0]]), "ref_logprobs": big}
    if where == "policy_logprobs":
        args["policy_logprobs"] = big
    else:
        args[where] = -big if where == "entropies" else big
    with pytest.raises(InvalidInput, match="overflows float64"):
        summarize(**args)


def test_row_sums_keep_small_l_between_large_ones() -> None:
    p = np.float32([[0.0, -1.0, -700.0]])
    q = np.float32([[-700.0, -1.0001, 0.0]])
    exact = math.fsum(np.float64(p[0]) - np.float64(q[0]))
    assert summarize(p, q).seq_kl[0] == pytest.approx(exact, rel=1e-6)


def test_top_share_when_nearly_every_l_is_negative() -> None:
    lt = np.full(10_000, -1.0)
    lt[:200] = np.linspace(1e-13, 2e-13, 200)
    p = np.minimum(lt, 0.0)[None, :] - 1.0
    q = p - lt[None, :]
    assert_matches_reference(summarize(p, q), reference(p, q, np.ones(p.shape, bool)), 1e-9)


def test_compiled_pass_refuses_buffers_that_do_not_fit(kernel: str, tmp_path: Any) -> None:
    """Direct calls to monitor._kernel with wrong sizes raise ValueError (no crash: run in a
    child process so that a crash would fail this test rather than end the session)."""
    if kernel != "compiled-avx2":
        pytest.skip("one run is enough: it calls monitor._kernel directly")
    code = """
import numpy as np, monitor._kernel as K
from monitor.divergence._passes import K3_POLY
coef = K3_POLY[np.dtype(np.float64)]
z, seq, sums = np.zeros(4), np.zeros(1), np.zeros(8)
hist, cand = np.zeros(80, np.int64), np.zeros(5)
cases = [
    (np.zeros(1), np.zeros(2), None, None, None, 1, 2),   # policy too short
    (z, z, None, None, None, 2**62, 4),                    # rows * cols overflows
    (z, z, None, None, None, -1, 4),                       # negative rows
    (z.astype(np.float32), z, None, None, None, 1, 4),     # item size is not float64
]
try:  # a candidate buffer must hold 4 more than the values it keeps
    K.stats(z, z, None, None, None, 1, 4, True, 1e-3, True, 1, 0.0, coef, seq, sums, hist, cand[:3])
    raise SystemExit("no ValueError for keep = 1 in a buffer of 3")
except ValueError:
    pass
for c in cases:
    try:
        K.stats(*c, True, 1e-3, True, 1, 0.0, coef, seq, sums, hist, cand)
    except ValueError:
        continue
    raise SystemExit(f"no ValueError for {c[5:]}")
for p, q, m, _, _, rows, cols in cases:  # the sample of the candidates' first level
    try:
        K.sampled_level(p, q, m, rows, cols, True, 0.01)
    except ValueError:
        continue
    raise SystemExit(f"no ValueError from sampled_level for {(rows, cols)}")
for start in (-1.0, float("nan"), float("inf")):  # the candidates' level
    try:
        K.stats(z, z, None, None, None, 1, 4, True, 1e-3, True, 1, start, coef, seq, sums, hist,
                cand)
        raise SystemExit(f"no ValueError for start {start}")
    except ValueError:
        pass
print("ok")
"""
    # from tmp_path: "" on sys.path is the cwd, and a source checkout has no built module
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)
