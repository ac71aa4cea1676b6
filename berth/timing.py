"""Deadline and backoff arithmetic: pure functions with an injectable clock."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


def compute_backoff(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    factor: float = 2.0,
    jitter: bool = False,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): base * factor**attempt, capped.

    With ``jitter`` the result is spread over [half, full] so that a hundred late
    guests do not retry in lockstep; ``rng`` returns a float in [0, 1).
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    # min() before the power would overflow for large attempt counts.
    exponent = min(attempt, 64)
    delay = min(cap_s, base_s * factor**exponent)
    if jitter:
        delay = delay / 2 + rng() * delay / 2
    return delay


def next_countdown(
    attempt: int, *, now: float, deadline_at: float, base_s: float, cap_s: float
) -> float:
    """Countdown for the next retry, never past the deadline, so the last check lands on it."""
    backoff = compute_backoff(attempt, base_s=base_s, cap_s=cap_s)
    return max(0.0, min(backoff, deadline_at - now))


@dataclass(frozen=True)
class Deadline:
    """An absolute point in wall-clock time shared between processes (epoch seconds)."""

    at: float
    clock: Clock = field(default=time.time, compare=False)

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.time) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.at
