"""The plan of one table: what it measures, decided from the options before
anything starts (made by ``_cli``, run by ``_runner``, printed by ``_report``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class _Plan:
    """What one table measures, decided from the options before anything starts."""

    command: str
    libraries: tuple[str, ...]
    skipped: dict[str, str]
    metrics: tuple[str, ...]
    sizes: dict[str, int]
    reps: int
    metric_reps: dict[str, int]  # each metric's reps; none more than ``reps``
    workers: int
    start_method: Optional[str]
    timeout: float
