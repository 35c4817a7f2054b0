"""Torch tensors handed to ``log_step`` without stalling the caller.

The caller's thread only copies raw bytes: a CPU tensor of a dtype numpy has (float16/32/64,
integers, bool) becomes a numpy copy; a bfloat16 tensor is copied as its 16-bit patterns
and widened to float32 on the background thread; a CUDA tensor is copied into a pinned host
buffer with ``non_blocking=True`` and a CUDA event recorded after the copy, and the
background thread waits for the event (so the training thread never waits for the device).
Values of deferred arrays are checked in the background (a bad one makes the step rejected,
counted, never an exception at the call).

torch is never imported here unless the caller passed a tensor (``is_tensor`` duck-types).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


class Deferred:
    """An array whose host copy is finished (bf16 widening, device copy) by the background
    thread: ``resolve()`` gives the numpy array. Shape and dtype are known at once."""

    __slots__ = ("_bits", "_event", "_host", "dtype", "nbytes", "shape")

    def __init__(self, host: Any, dtype: np.dtype, *, bits: bool, event: Any = None) -> None:
        self._host = host  # numpy, or a torch CPU tensor (pinned) being filled by a device copy
        self._bits = bits  # the host array holds bfloat16 bit patterns as int16
        self._event = event
        self.shape = tuple(host.shape)
        self.dtype = dtype
        self.nbytes = int(np.prod(self.shape)) * (2 if bits else dtype.itemsize)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def reshape(self, *shape: int) -> Deferred:
        return Deferred(self._host.reshape(*shape), self.dtype, bits=self._bits, event=self._event)

    def resolve(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        arr = self._host if isinstance(self._host, np.ndarray) else self._host.numpy()
        if self._bits:  # bfloat16 is the top half of a float32
            return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return arr


def host_copy(value: Any) -> np.ndarray | Deferred:
    """The caller's part of copying a tensor: raw bytes only."""
    import torch

    t = value.detach()
    if t.device.type != "cpu":
        return _device_copy(t, torch)
    if t.dtype == torch.bfloat16:  # numpy copies the 16-bit patterns (no torch threads)
        bits = t.contiguous().view(torch.int16).numpy().copy()
        return Deferred(bits, np.dtype(np.float32), bits=True)
    try:
        return t.numpy().copy()
    except TypeError:  # another dtype numpy lacks: widen here (rare, not a hot path)
        return t.float().numpy()


def _device_copy(t: Any, torch: Any) -> Deferred:
    bits = t.dtype == torch.bfloat16
    src = t.contiguous().view(torch.int16) if bits else t.contiguous()
    host = torch.empty(src.shape, dtype=src.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(src, non_blocking=True)
    event = None
    if t.device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
    dtype = np.dtype(np.float32) if bits else _numpy_dtype(host)
    return Deferred(host, dtype, bits=bits, event=event)


def _numpy_dtype(host: Any) -> np.dtype:
    import torch

    return torch.empty(0, dtype=host.dtype).numpy().dtype


def resolve_arrays(item: Any) -> None:
    """Finish the deferred copies of a StepItem in place (the background thread's part)."""
    for name in ("policy_logprobs", "ref_logprobs", "mask", "token_ids"):
        value = getattr(item, name)
        if isinstance(value, Deferred):
            setattr(item, name, value.resolve())
    if item.extra and any(isinstance(v, Deferred) for v in item.extra.values()):
        item.extra = {k: now(v) for k, v in item.extra.items()}


def now(value: Any) -> Any:
    """``value`` as a numpy array if it was deferred (for the few places that need values at
    once: rewards, integer arrays, parts of a step built from several calls)."""
    return value.resolve() if isinstance(value, Deferred) else value
