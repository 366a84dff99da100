"""Estimated start times for queued jobs: a pure simulation, no I/O.

The estimate replays the queue in FIFO order over the configured slots. A job that holds a slot is
expected to end at `started_at + duration(tool)`; one already past that is assumed to end now.
Each queued job takes the slot that frees first and holds it for its tool's duration. A tool's
duration is the median of its last DURATION_SAMPLES completed runs (started -> finished); a tool
with no completed run borrows the median over every tool; with no completed run at all nothing can
be estimated and the answer is None ("unknown"), never a guess.

Jobs far down a long queue are not loaded one by one: `skip` advances the simulation over N jobs
of the overall median duration in closed form (round robin over the slots), which is exact when
every job takes that long and an approximation otherwise; callers say so.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import median

DURATION_SAMPLES = 20  # completed runs per tool (and overall) behind a median


@dataclass(frozen=True)
class Durations:
    """Median run durations in seconds, with how many runs each median is made of."""

    per_tool: dict[str, tuple[float, int]] = field(default_factory=dict)
    overall: tuple[float, int] | None = None

    @classmethod
    def from_samples(cls, per_tool: dict[str, Sequence[float]], overall: Sequence[float]) -> Durations:
        return cls(
            per_tool={tool: (float(median(xs)), len(xs)) for tool, xs in per_tool.items() if xs},
            overall=(float(median(overall)), len(overall)) if overall else None,
        )

    def of(self, tool: str) -> float | None:
        """Seconds one run of `tool` is expected to take; None when nothing is known."""
        known = self.per_tool.get(tool) or self.overall
        return None if known is None else known[0]

    def to_dict(self) -> dict[str, object]:
        return {
            "method": f"median of the last {DURATION_SAMPLES} completed runs per tool, "
                      "else over all tools; unknown without any completed run",
            "per_tool": {t: {"median_seconds": round(m, 3), "samples": n} for t, (m, n) in sorted(self.per_tool.items())},
            "overall": None if self.overall is None
            else {"median_seconds": round(self.overall[0], 3), "samples": self.overall[1]},
        }


class Simulation:
    """The slots as a heap of 'free after N seconds from now' (math.inf: unknown)."""

    def __init__(
        self, now: datetime, limit: int, holding: Iterable[tuple[datetime | None, str]], durations: Durations
    ) -> None:
        self.now = now
        self.durations = durations
        ends = []
        for started_at, tool in holding:
            run = durations.of(tool)
            if run is None or started_at is None:
                ends.append(math.inf)
            else:
                ends.append(max(0.0, (started_at - now).total_seconds() + run))
        ends.sort()
        free = [0.0] * max(0, limit - len(ends))
        # More holders than slots (the limit was lowered): the first slot frees when enough of
        # them have ended, so the earliest ends do not open a slot.
        kept = ends[len(ends) - limit + len(free):] if limit > 0 else []
        self.heap = sorted(free + kept) if limit > 0 else [math.inf]
        heapq.heapify(self.heap)

    def next_start(self, tool: str) -> datetime | None:
        """Give the next queued job (of `tool`) the slot that frees first; its start, or None."""
        free_at = heapq.heappop(self.heap)
        run = self.durations.of(tool)
        heapq.heappush(self.heap, math.inf if run is None else free_at + run)
        return None if math.isinf(free_at) else self.now + timedelta(seconds=free_at)

    def skip(self, count: int) -> None:
        """Advance over `count` jobs of the overall median duration (round robin, closed form)."""
        if count <= 0:
            return
        run = None if self.durations.overall is None else self.durations.overall[0]
        if run is None:
            self.heap = [math.inf] * len(self.heap)
            return
        slots = sorted(self.heap)
        rounds, extra = divmod(count, len(slots))
        self.heap = [t + (rounds + (1 if i < extra else 0)) * run for i, t in enumerate(slots)]
        heapq.heapify(self.heap)


def estimate_starts(
    now: datetime,
    limit: int,
    paused: bool,
    holding: Iterable[tuple[datetime | None, str]],
    queued_tools: Sequence[str],
    durations: Durations,
    *,
    skip_before: int = 0,
) -> list[datetime | None]:
    """Estimated starts of queued jobs given in FIFO order (after `skip_before` unloaded jobs
    ahead of them). A paused queue starts nothing: every estimate is None."""
    if paused:
        return [None] * len(queued_tools)
    simulation = Simulation(now, limit, holding, durations)
    simulation.skip(skip_before)
    return [simulation.next_start(tool) for tool in queued_tools]
