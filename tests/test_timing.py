"""Backoff and deadline arithmetic, alone, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.timing import Deadline, compute_backoff, next_countdown


def test_backoff_doubles_from_the_base_until_the_cap() -> None:
    delays = [compute_backoff(n, base_s=0.1, cap_s=1.0) for n in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_with_jitter_stays_between_half_and_full_delay() -> None:
    assert compute_backoff(3, base_s=0.1, cap_s=10, jitter=True, rng=lambda: 0.0) == pytest.approx(0.4)
    assert compute_backoff(3, base_s=0.1, cap_s=10, jitter=True, rng=lambda: 0.999) == pytest.approx(0.7996)


def test_backoff_refuses_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        compute_backoff(-1, base_s=0.1, cap_s=1)


@given(attempt=st.integers(0, 10_000), base=st.floats(0.001, 10), cap=st.floats(0.001, 100))
def test_backoff_never_exceeds_the_cap_even_after_many_attempts(attempt: int, base: float, cap: float) -> None:
    assert 0 < compute_backoff(attempt, base_s=base, cap_s=cap) <= cap


def test_countdown_is_clipped_so_the_last_check_lands_on_the_deadline() -> None:
    assert next_countdown(5, now=100.0, deadline_at=100.3, base_s=0.1, cap_s=1.0) == pytest.approx(0.3)
    assert next_countdown(0, now=100.0, deadline_at=150.0, base_s=0.1, cap_s=1.0) == pytest.approx(0.1)
    assert next_countdown(9, now=200.0, deadline_at=150.0, base_s=0.1, cap_s=1.0) == 0.0


@given(attempt=st.integers(0, 100), now=st.floats(0, 1e6), left=st.floats(-100, 100))
def test_countdown_never_passes_the_deadline(attempt: int, now: float, left: float) -> None:
    countdown = next_countdown(attempt, now=now, deadline_at=now + left, base_s=0.1, cap_s=1.0)
    assert 0.0 <= countdown <= max(0.0, left) + 1e-9


def test_deadline_uses_the_injected_clock() -> None:
    now = [1000.0]
    deadline = Deadline.after(5.0, clock=lambda: now[0])
    assert deadline.remaining() == 5.0 and not deadline.expired()
    now[0] = 1004.5
    assert deadline.remaining() == pytest.approx(0.5)
    now[0] = 1005.0
    assert deadline.expired() and deadline.remaining() == 0.0
