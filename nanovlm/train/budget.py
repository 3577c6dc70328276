"""The time budget (`max_train_time`) that every stage of a run shares.

Once CALIBRATION_STEPS steps are timed, a stage's remaining steps are cut to fit (never raised)
and its schedule stretches over the new count; the vision stage takes at most VISION_SHARE.
"""

from __future__ import annotations

CALIBRATION_STEPS = 20  # steps timed before a budget fixes the step count
VISION_SHARE = 0.6  # of max_train_time, at most, for the vision stage


def fit_steps(total: int, done: int, elapsed_s: float, budget_s: float) -> int:
    """The steps that fit a time budget, measured after `done` steps took `elapsed_s` (never more
    than `total`, never fewer than `done`: a stage over its budget stops)."""
    if done <= 0:
        return total
    return max(done, min(total, done + int((budget_s - elapsed_s) / (elapsed_s / done))))


def stage_budget(max_train_time: float, spent_s: float, share: float = 1.0) -> float | None:
    """Seconds a stage may take: `share` of the budget less what earlier stages spent (None: no budget)."""
    return max_train_time * share - spent_s if max_train_time else None
