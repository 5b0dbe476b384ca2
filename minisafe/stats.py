"""Intervals for the rates the toolkit reports.

Every rate is a count k of n prompts. A single rate gets a Wilson score interval (it stays inside [0, 1] and
behaves at k = 0 and k = n, where the normal approximation collapses to a point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass(frozen=True)
class Rate:
    """k of n, with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def percent(self, digits: int = 0) -> str:
        """'42% [33, 52] (n=100)': the rate and its interval in percent, with the sample size."""
        low, high = self.interval
        return f"{100 * self.value:.{digits}f}% [{100 * low:.{digits}f}, {100 * high:.{digits}f}] (n={self.n})"


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (nan, nan when n = 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
