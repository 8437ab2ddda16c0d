"""Statistics of a quantity over training steps: a moving average, step bins, per-bin means with a
95% interval. Pure functions over arrays."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centred mean `[S]` over `window` points of `values` `[S]`, the window shrinking at the ends
    (no padding bias)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    cumulative = np.concatenate([[0.0], np.cumsum(v)])
    index = np.arange(v.size)
    lo = np.maximum(index - window // 2, 0)
    hi = np.minimum(index + window // 2 + 1, v.size)
    return (cumulative[hi] - cumulative[lo]) / (hi - lo)


def step_bins(steps: np.ndarray, max_bins: int = 40) -> np.ndarray:
    """Bin edges `[bins + 1]` over steps `[N]`: one bin per distinct step when there are few, else
    `max_bins` equal windows."""
    if steps.size == 0:
        return np.array([0.0, 1.0])
    distinct = np.unique(steps)
    if distinct.size <= max_bins:
        return np.append(distinct, distinct[-1] + 1).astype(float)
    return np.linspace(steps.min(), steps.max() + 1, max_bins + 1)


@dataclasses.dataclass
class Binned:
    """Per-bin statistics of one quantity, each `[bins kept]`; bins without a finite value are left out."""

    centers: np.ndarray  # mean step of the bin's values
    mean: np.ndarray
    low: np.ndarray  # mean - 1.96 standard errors
    high: np.ndarray  # mean + 1.96 standard errors


def binned_stats(steps: np.ndarray, values: np.ndarray, edges: np.ndarray) -> Binned:
    """Mean of `values` `[N]` within each step bin (`edges` from `step_bins`), with a 95% interval
    of that mean.

    The interval of the mean, not the spread of the values, is what says whether a curriculum trend
    is real; and the features are small integers, whose percentiles jump between them.
    """
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        keep = (which == b) & np.isfinite(values)
        if keep.any():
            v = values[keep]
            half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else 0.0
            rows.append((steps[keep].mean(), v.mean(), v.mean() - half, v.mean() + half))
    columns = np.array(rows, dtype=float).reshape(-1, 4).T
    return Binned(*columns)
