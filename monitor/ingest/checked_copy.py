"""``log_step``'s copy of numpy log-prob arrays and their mask in one C call
(``copy_checked`` in ``monitor/_kernel.c``): each row copied, then checked while in cache as
:func:`monitor.divergence.inputs.check_values` checks it, and the mask's empty rows counted,
with the GIL released once. numpy takes the GIL back after each of the seven or so passes of
the same work, and while the writer's threads run Python each of those can make the training
loop wait up to the switch interval (5 ms by default).

Only the common case comes here (numpy float32/float64 arrays of one shape, a bool mask or
none); anything else, and installs without the extension, go through the numpy path of
:mod:`monitor.ingest.step_input`, which gives the same arrays and the same errors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from monitor.divergence import inputs
from monitor.divergence._constants import LOGPROB_TOLERANCE
from monitor.errors import InvalidInput

try:
    import monitor._kernel as extension
except ImportError:  # built without a C compiler: step_input's numpy path does the same work
    extension = None

#: Whether ``log_step`` uses the C copy where it can (tests switch it off for the numpy path).
ENABLED = True
#: Whether that copy may use its AVX2 loop (tests switch it off for the portable loop).
SIMD = True

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Copied(NamedTuple):
    """The copies (2-D, in the order given), the mask's copy and its rows without a response
    token, and the first bad position of each array under the mask ((-1, -1): none)."""

    arrays: list[np.ndarray]
    mask: np.ndarray | None
    n_empty: int
    bad: list[tuple[int, int]]


def usable(arrays: list[Any], mask: Any, max_values: int) -> bool:
    """Whether :func:`copy` takes these: numpy float32/float64 arrays of one 1-D or 2-D shape
    with at most ``max_values`` values (none of them empty), and a bool mask of that shape or
    None."""
    if extension is None or not ENABLED:
        return False
    if not all(type(a) is np.ndarray for a in arrays):  # torch tensors, lists: numpy path
        return False
    shape = arrays[0].shape
    if len(shape) not in (1, 2) or 0 in shape or arrays[0].size > max_values:
        return False
    if not all(a.dtype in _FLOATS and a.shape == shape for a in arrays):
        return False
    return mask is None or (
        type(mask) is np.ndarray and mask.dtype == np.bool_ and mask.shape == shape
    )


def copy(arrays: list[np.ndarray], kinds: list[inputs.Kind], mask: Any, check: bool) -> Copied:
    """Private 2-D copies of ``arrays`` (as :func:`usable` takes them) and of ``mask``;
    ``check``: find the first bad value of each under the mask (else none is reported)."""
    srcs = tuple(a.reshape(1, -1) if a.ndim == 1 else a for a in arrays)
    dsts = tuple(np.empty(a.shape, a.dtype) for a in srcs)
    m = None if mask is None else (mask.reshape(1, -1) if mask.ndim == 1 else mask)
    m_dst = None if m is None else np.empty(m.shape, np.bool_)
    entropy = tuple(kind == "entropy" for kind in kinds)
    n_empty, bad = extension.copy_checked(
        srcs, dsts, entropy, m, m_dst, LOGPROB_TOLERANCE, check, SIMD
    )
    cols = srcs[0].shape[1]
    return Copied(
        list(dsts), m_dst, n_empty, [divmod(k, cols) if k >= 0 else (-1, -1) for k in bad]
    )


def raise_first_bad(
    copied: Copied, names: list[str], kinds: list[inputs.Kind], layout: inputs.Layout
) -> None:
    """InvalidInput for the first array, in order, with a bad value (as ``check_values``)."""
    for a, name, kind, (i, j) in zip(copied.arrays, names, kinds, copied.bad, strict=True):
        if i >= 0:
            raise InvalidInput(
                inputs.value_message(inputs.position(name, i, j, layout), float(a[i, j]), kind)
            )
