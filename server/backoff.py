"""Exponential backoff for a retry loop: waits that double, up to a ceiling."""

from __future__ import annotations


class Backoff:
    """The waits between tries of something that keeps failing: ``initial_s``, then twice the
    last wait, never more than ``max_s``; :meth:`reset` after a success starts over."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        if initial_s <= 0 or max_s <= 0:
            raise ValueError(f"backoff waits must be positive, not {initial_s} and {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._next_s = min(initial_s, max_s)

    def next(self) -> float:
        """The wait before the next try, in seconds (each call is one more failure)."""
        wait = self._next_s
        self._next_s = min(wait * 2, self.max_s)
        return wait

    def reset(self) -> None:
        self._next_s = min(self.initial_s, self.max_s)
