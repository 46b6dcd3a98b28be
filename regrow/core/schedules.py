"""When topology updates happen and how many connections each one rewires (RigL's schedule)."""
from __future__ import annotations

import math
from dataclasses import dataclass

DROP_SCHEDULES = ("cosine", "constant", "linear")


@dataclass(frozen=True)
class UpdateSchedule:
    """Updates at steps t (1-based optimizer steps) with t % interval == 0 and t < end.

    ``end = stop_fraction * total_steps``. The drop fraction at an update step is
    alpha/2 (1 + cos(pi t / end)) for cosine, alpha (1 - t / end) for linear, alpha for constant.
    """

    total_steps: int
    interval: int = 100
    drop_fraction: float = 0.3
    schedule: str = "cosine"
    stop_fraction: float = 0.75

    def __post_init__(self) -> None:
        if self.schedule not in DROP_SCHEDULES:
            raise ValueError(f"unknown drop_schedule '{self.schedule}'; choose one of {', '.join(DROP_SCHEDULES)}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"update_interval must be an integer >= 1, got {self.interval!r}")
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1], got {self.drop_fraction}")
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {self.stop_fraction}")

    @property
    def end(self) -> float:
        return self.stop_fraction * self.total_steps

    def is_update(self, t: int) -> bool:
        return t > 0 and t % self.interval == 0 and t < self.end

    def update_steps(self) -> range:
        """All update steps, in order."""
        last = math.ceil(self.end) - 1
        return range(self.interval, last + 1, self.interval)

    def fraction(self, t: int) -> float:
        """Fraction of a layer's active connections rewired at update step t."""
        if self.schedule == "constant":
            return self.drop_fraction
        progress = min(t / self.end, 1.0)
        if self.schedule == "linear":
            return self.drop_fraction * (1.0 - progress)
        return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * progress))
