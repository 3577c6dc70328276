"""What every loader shares: a strict check that names every missing, unexpected and
mis-shaped tensor at once, and a readable error type."""

from __future__ import annotations

from typing import Mapping


class WeightLoadError(ValueError):
    """Weights do not fit the model; the message lists every problem."""


def check_state_dict(state: Mapping[str, "object"], expected_shapes: Mapping[str, tuple[int, ...]],
                     source: str) -> None:
    """Raise WeightLoadError listing every missing, unexpected and mis-shaped key."""
    missing = sorted(k for k in expected_shapes if k not in state)
    unexpected = sorted(k for k in state if k not in expected_shapes)
    misshaped = sorted(
        f"{k}: file has {tuple(state[k].shape)}, model needs {tuple(expected_shapes[k])}"
        for k in expected_shapes
        if k in state and tuple(state[k].shape) != tuple(expected_shapes[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(_clip(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(_clip(unexpected))}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(_clip(misshaped))}")
    if problems:
        raise WeightLoadError(f"cannot load {source}: " + " | ".join(problems)
                              + ". Check that the config matches the checkpoint.")


def _clip(items: list[str], limit: int = 20) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... and {len(items) - limit} more"]
