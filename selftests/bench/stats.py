"""Repeat statistics: median and spread of a handful of runs, and paired ratios.

Medians, not means: one repeat disturbed by a background build moves a mean a lot and a
median of five hardly at all; min/max are kept so the spread stays visible.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summarize(values: Sequence[float]) -> dict:
    """median, min, max, mean, stdev (0 for one value) and relative spread of the values."""
    if not values:
        raise ValueError("no values to summarize")
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "n": len(values),
        "median": median,
        "min": low,
        "max": high,
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        # (max - min) / median: one number to say how far apart the repeats landed.
        "spread": (high - low) / median if median else 0.0,
    }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """numerators[i] / denominators[i]: repeat i of two variants ran back to back."""
    if len(numerators) != len(denominators):
        raise ValueError("paired ratios need the same number of repeats on both sides")
    return [n / d for n, d in zip(numerators, denominators)]


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float]) -> dict:
    """The ratio of the medians, plus the median/min/max of the per-repeat ratios."""
    pairs = summarize(paired_ratios(numerators, denominators))
    return {
        "of_medians": statistics.median(numerators) / statistics.median(denominators),
        "paired_median": pairs["median"],
        "paired_min": pairs["min"],
        "paired_max": pairs["max"],
    }
