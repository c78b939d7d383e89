"""Acceleration ratios: how many fewer steps one quality curve needs to reach another's level."""

from __future__ import annotations


def steps_to_reach(steps, values, target: float) -> float | None:
    """The first training step at which a quality curve (lower is better) reaches `target`,
    linearly interpolated between the two evaluations that bracket the crossing; None if never."""
    steps, values = [float(s) for s in steps], [float(v) for v in values]
    if len(steps) != len(values) or not steps:
        raise ValueError(f"steps and values must be non-empty and of equal length, got {len(steps)} and {len(values)}")
    for i, v in enumerate(values):
        if v <= target:
            if i == 0:
                return steps[0]
            s0, v0, s1 = steps[i - 1], values[i - 1], steps[i]
            return s0 + (v0 - target) / (v0 - v) * (s1 - s0)
    return None


def acceleration_ratio(steps, baseline, method) -> dict:
    """How much sooner `method` reaches the baseline's final quality (curves at the same steps).

    target = baseline[-1]; ratio = steps_to_reach(baseline) / steps_to_reach(method). None (with
    reached=False) when the method never gets there within the evaluated steps."""
    target = float(baseline[-1])
    base_steps = steps_to_reach(steps, baseline, target)
    method_steps = steps_to_reach(steps, method, target)
    return {"target": target, "baseline_steps": base_steps, "method_steps": method_steps,
            "reached": method_steps is not None,
            "ratio": None if method_steps is None else base_steps / method_steps}
