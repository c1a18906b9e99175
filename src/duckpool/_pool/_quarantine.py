"""Quarantine: a callable whose runs keep killing their worker is refused for a while.

With ``quarantine_after=N``, N worker deaths in a row while running the same
callable (its label, ``module.qualname``) put it in quarantine for
``quarantine_seconds``: submitting it fails at once with
``TaskQuarantinedError``, and so do its calls already queued.  A run that
returns (a value or the task's own exception) ends the streak.

Pure state, no processes: the pool calls it with its lock held.
"""

from __future__ import annotations

from typing import Optional

from duckpool._errors import TaskQuarantinedError


class Quarantine:
    """Death streaks per callable, and the callables refused until when."""

    __slots__ = ("after", "seconds", "streaks", "until")

    def __init__(self, after: Optional[int], seconds: float) -> None:
        #: Deaths in a row that quarantine a callable (None: never).
        self.after = after
        self.seconds = seconds
        #: Per label: worker deaths in a row while running it.
        self.streaks: dict[str, int] = {}
        #: Per quarantined label: when it is accepted again (monotonic).
        self.until: dict[str, float] = {}

    def refusal(self, label: str, now: float) -> Optional[TaskQuarantinedError]:
        """The error a call of ``label`` fails with now, or None if it may run."""
        until = self.until.get(label)
        if until is None:
            return None
        if now >= until:  # served its time: a clean slate
            del self.until[label]
            self.streaks.pop(label, None)
            return None
        return self.error(label, until - now)

    def error(self, label: str, retry_after: float) -> TaskQuarantinedError:
        deaths = self.streaks.get(label, 0)
        return TaskQuarantinedError(
            f"{label} is in quarantine for another {retry_after:.1f} s: its last "
            f"{deaths} runs each killed their worker process",
            callable_name=label,
            deaths=deaths,
            retry_after=retry_after,
        )

    def on_death(self, label: str, now: float) -> bool:
        """A worker died running ``label``; True if that puts it in quarantine."""
        if self.after is None:
            return False
        deaths = self.streaks.get(label, 0) + 1
        self.streaks[label] = deaths
        if deaths < self.after:
            return False
        self.until[label] = now + self.seconds
        return True

    def on_return(self, label: str) -> None:
        """A run of ``label`` returned: its streak ends."""
        self.streaks.pop(label, None)

    def active(self, now: float) -> tuple[str, ...]:
        """The labels refused now, sorted."""
        return tuple(sorted(label for label, until in self.until.items() if until > now))
