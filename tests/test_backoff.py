"""The query log writer's retry waits."""

from __future__ import annotations

import pytest

from server.backoff import Backoff


def test_waits_double_up_to_the_ceiling() -> None:
    backoff = Backoff(0.05, 1.0)
    waits = [backoff.next() for _ in range(7)]
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_reset_starts_over_after_a_success() -> None:
    backoff = Backoff(0.1, 5.0)
    for _ in range(4):
        backoff.next()
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)
    assert backoff.next() == pytest.approx(0.2)


def test_no_wait_exceeds_the_ceiling_even_the_first() -> None:
    backoff = Backoff(0.05, 0.02)
    assert [backoff.next() for _ in range(3)] == pytest.approx([0.02, 0.02, 0.02])


@pytest.mark.parametrize(("initial_s", "max_s"), [(0.0, 1.0), (0.1, 0.0), (-1.0, 1.0)])
def test_waits_must_be_positive(initial_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Backoff(initial_s, max_s)
