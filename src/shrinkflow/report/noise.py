"""How far an accuracy can move by chance: the intervals the report puts on every number it
compares (scipy.stats computes them).

Two sources of noise, two intervals, both at ``CONFIDENCE``:

- **Across training seeds** (``seeds`` with two or more entries): the Student-t interval of the
  mean over seeds, ``mean ± t(0.975, n-1) · sd / sqrt(n)``. It holds everything that changes
  with the seed (initialisation, batch order, which filters a random method drops), and the
  split's finite size. A drop from the baseline is paired by seed (each seed's baseline minus
  that seed's artefact), which removes the seed's shared part from the comparison.
- **One seed**: only the evaluation split's finite size is visible. Each accuracy gets the
  Wilson score interval of a binomial proportion (k correct of n images), and a drop the
  Newcombe hybrid score interval of a difference of two proportions built from the two Wilson
  intervals (Newcombe 1998, method 10). Newcombe's interval treats the two accuracies as
  independent; both are measured on the same images, so it is wider than the paired truth:
  a conservative "within noise".

A drop whose interval includes zero is *within noise*: the data cannot tell it from no change.
A Student-t interval knows nothing of the bounds of a share: an accuracy's is clipped to [0, 1]
(three seeds at 0.97 +- 4 pt would otherwise reach past 100 %), a drop's to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # the usual two-sided 95 %


class Interval(NamedTuple):
    mean: float
    low: float
    high: float

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


def student_t(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` (two or more) and its Student-t interval."""
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        raise ValueError("a Student-t interval needs two or more values")
    mean = float(data.mean())
    half = float(
        stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size)
    )
    return Interval(mean, mean - half, mean + half)


def wilson(accuracy: float, images: int, confidence: float = CONFIDENCE) -> Interval:
    """``accuracy`` measured on ``images`` images and its Wilson score interval."""
    images = int(images)
    if images < 1:
        raise ValueError(f"a binomial interval needs at least one image, not {images}")
    correct = round(accuracy * images)
    ci = stats.binomtest(correct, images).proportion_ci(confidence, method="wilson")
    return Interval(float(accuracy), float(ci.low), float(ci.high))


def newcombe_difference(first: Interval, second: Interval) -> Interval:
    """``first.mean - second.mean`` and its Newcombe hybrid score interval, from the two
    proportions' Wilson intervals."""
    diff = first.mean - second.mean
    below = math.hypot(first.mean - first.low, second.high - second.mean)
    above = math.hypot(first.high - first.mean, second.mean - second.low)
    return Interval(diff, diff - below, diff + above)


def clipped(interval: Interval, low: float, high: float) -> Interval:
    """``interval`` with its ends kept within ``[low, high]``."""
    return Interval(interval.mean, max(interval.low, low), min(interval.high, high))


def accuracy_interval(values: Sequence[float], images: int) -> Interval:
    """One accuracy over seeds: Student-t with two or more seeds (within [0, 1]), Wilson with
    one."""
    if len(values) >= 2:
        return clipped(student_t(values), 0.0, 1.0)
    return wilson(values[0], images)


def drop_interval(baseline: Sequence[float], values: Sequence[float], images: int) -> Interval:
    """Baseline minus artefact accuracy (positive is worse), seed by seed in the same order:
    paired Student-t with two or more seeds, Newcombe with one."""
    if len(values) != len(baseline):
        raise ValueError("a paired drop needs one baseline accuracy per seed")
    if len(values) >= 2:
        paired = np.asarray(baseline, dtype=float) - np.asarray(values, dtype=float)
        return clipped(student_t(paired), -1.0, 1.0)
    return newcombe_difference(wilson(baseline[0], images), wilson(values[0], images))


def describe(seeds: int, images: int, split: str) -> str:
    """Which interval a report shows, in words."""
    percent = f"{CONFIDENCE * 100:g} %"
    if seeds >= 2:
        return f"{percent} Student-t interval over {seeds} training seeds"
    return f"{percent} Wilson interval (one seed, {images:,} {split} images)"
