"""What the mesh cost: worker-seconds used against static provisioning for the peak (pure).

The core calls :meth:`Usage.tick` once per committed tick with the wall
clock and the live worker count, and :meth:`Usage.plan` for every plan it
applies. ``static_peak_worker_seconds`` is what a fixed mesh sized for the
observed peak would have used over the same time.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import attrs

from meshd.mesh.planner import Plan

TIMELINE_LENGTH = 20_000


@attrs.frozen
class Sample:
    """One tick, for plots: seconds since start, workers, leaves, tick time."""

    seconds: float
    tick: int
    workers: int
    leaves: int
    tick_ms: float


@attrs.define
class Usage:
    mode: str
    started: float = 0.0
    core_cpu_started: float = 0.0
    last: float = 0.0
    worker_seconds: float = 0.0
    worker_cpu_ms: float = 0.0
    workers: int = 0
    peak_workers: int = 0
    leaves: int = 0
    max_leaves: int = 0
    plans: int = 0
    splits: int = 0
    merges: int = 0
    moves: int = 0
    handoffs: int = 0
    """Entities that crossed from one worker to another as they moved."""
    plan_handoffs: int = 0
    """Entities re-homed because a plan changed the layout."""
    workers_started: int = 0
    workers_stopped: int = 0
    timeline: deque[Sample] = attrs.field(factory=lambda: deque(maxlen=TIMELINE_LENGTH))

    def begin(self, now: float, core_cpu: float, workers: int) -> None:
        """Start the clocks: the first workers are up, ticking starts."""
        self.started = self.last = now
        self.core_cpu_started = core_cpu
        self.workers = self.peak_workers = workers

    def tick(
        self,
        now: float,
        tick: int,
        workers: int,
        leaves: int,
        tick_ms: float,
        cpu_ms: float,
        handoffs: int = 0,
    ) -> None:
        """Account the wall time since the last tick to the workers that were live."""
        self.handoffs += handoffs
        self.worker_seconds += (now - self.last) * self.workers
        self.last = now
        self.workers = workers
        self.peak_workers = max(self.peak_workers, workers)
        self.leaves = leaves
        self.max_leaves = max(self.max_leaves, leaves)
        self.worker_cpu_ms += cpu_ms
        self.timeline.append(Sample(now - self.started, tick, workers, leaves, tick_ms))

    def plan(self, plan: Plan, handoffs: int) -> None:
        self.plans += 1
        self.splits += len(plan.splits)
        self.merges += len(plan.merges)
        self.moves += len(plan.moves)
        self.plan_handoffs += handoffs
        self.workers_started += len(plan.started)
        self.workers_stopped += len(plan.stopped)

    def report(self, core_cpu_now: float) -> dict[str, Any]:
        elapsed = self.last - self.started
        static = self.peak_workers * elapsed
        return {
            "mode": self.mode,
            "elapsed_s": round(elapsed, 3),
            "workers": self.workers,
            "peak_workers": self.peak_workers,
            "leaves": self.leaves,
            "max_leaves": self.max_leaves,
            "worker_seconds": round(self.worker_seconds, 3),
            "static_peak_worker_seconds": round(static, 3),
            "savings_percent": round(100.0 * (1 - self.worker_seconds / static), 1)
            if static
            else 0.0,
            "worker_cpu_seconds": round(self.worker_cpu_ms / 1000.0, 3),
            "core_cpu_seconds": round(core_cpu_now - self.core_cpu_started, 3),
            "plans": self.plans,
            "splits": self.splits,
            "merges": self.merges,
            "moves": self.moves,
            "handoffs": self.handoffs,
            "handoffs_per_s": round(self.handoffs / elapsed, 3) if elapsed else 0.0,
            "plan_handoffs": self.plan_handoffs,
            "workers_started": self.workers_started,
            "workers_stopped": self.workers_stopped,
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
