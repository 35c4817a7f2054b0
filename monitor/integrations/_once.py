"""Warnings an integration logs once per cause: a hook runs every training step, and a step
it cannot log must not flood the trainer's output (the failures are counted elsewhere)."""

from __future__ import annotations

import logging
from typing import Any


class WarnOnce:
    """``warn(key, msg, *args)`` logs ``msg`` the first time ``key`` is seen, never again."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._seen: set[str] = set()

    def __call__(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self._log.warning(msg, *args)
