"""Intervals for the rates the toolkit reports, and the comparisons between fine-tuning methods.

Every rate is a count k of n prompts. A single rate gets a Wilson score interval (it stays inside [0, 1] and
behaves at k = 0 and k = n, where the normal approximation collapses to a point). Rates over several seeds and
the differences between methods get bootstrap intervals (below). A rate counted by a refusal judge that disagrees
with hand labels on that kind of response gets its interval widened by the judge's disagreement (judge_margin,
widened_interval; the rule is at the end of this module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass(frozen=True)
class Rate:
    """k of n, with its 95% Wilson interval."""

    k: int
    n: int

    @classmethod
    def of(cls, record: dict) -> Rate:
        """The Rate of a JSON record holding its "k" and "n" (as the sweep and the attack reports store them)."""
        return cls(record["k"], record["n"])

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


# ---------------------------------------------------------------- comparisons over seeds and prompts
#
# A method is fine-tuned with several seeds and every fine-tune answers the same prompts, so its outcomes form a
# [seeds, prompts] table of 0/1 (1 = answered a malicious prompt). Intervals come from a two-level bootstrap that
# resamples seeds and prompts with replacement; a paired comparison resamples the same seeds and prompts for both
# methods, so what the two share (a prompt every model answers) cancels out.

BOOTSTRAP_REPS = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean (as a fraction) with its 95% bootstrap interval."""

    value: float
    low: float
    high: float

    def points(self, signed: bool = False) -> str:
        """'12.5 [4.0, 21.0]' in percentage points."""
        sign = "+" if signed else ""
        return f"{100 * self.value:{sign}.1f} [{100 * self.low:{sign}.1f}, {100 * self.high:{sign}.1f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def widened(self, margin: float) -> Estimate:
        """The same mean with its interval widened by a judge's disagreement (widened_interval, below)."""
        return Estimate(self.value, *widened_interval(self.low, self.high, margin))


def _draws(seeds: int, prompts: int, reps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap indices: [reps, seeds] seed draws and [reps, prompts] prompt draws."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(seeds, (reps, seeds), generator=g), torch.randint(prompts, (reps, prompts), generator=g)


def bootstrap_mean(outcomes: torch.Tensor, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> Estimate:
    """Mean of a [seeds, prompts] table with a 95% percentile interval over resampled seeds and prompts."""
    outcomes = torch.as_tensor(outcomes, dtype=torch.float64).reshape(-1, outcomes.shape[-1])
    s, p = _draws(*outcomes.shape, reps, seed)
    means = outcomes[s[:, :, None], p[:, None, :]].mean(dim=(1, 2))
    return _estimate(outcomes.mean().item(), means)


def bootstrap_ratio(numerators: torch.Tensor, denominators: torch.Tensor, reps: int = BOOTSTRAP_REPS,
                    seed: int = 0) -> Estimate:
    """sum(numerators) / sum(denominators) of two [seeds, prompts] tables (a per-token mean, such as the NLL behind
    a perplexity, from per-prompt sums and token counts), with a 95% percentile interval over resampled seeds and
    prompts: each draw takes the same seeds and prompts from both tables. Every denominator must be positive, so that
    no draw divides by zero."""
    num = torch.as_tensor(numerators, dtype=torch.float64)
    den = torch.as_tensor(denominators, dtype=torch.float64)
    if num.shape != den.shape:
        raise ValueError(f"numerators {tuple(num.shape)} and denominators {tuple(den.shape)} differ in shape")
    if not (den > 0).all():
        raise ValueError("denominators must all be positive (a draw of only zeros would divide by zero)")
    num, den = num.reshape(-1, num.shape[-1]), den.reshape(-1, den.shape[-1])
    s, p = _draws(*num.shape, reps, seed)
    pick = (s[:, :, None], p[:, None, :])
    ratios = num[pick].sum(dim=(1, 2)) / den[pick].sum(dim=(1, 2))
    return _estimate((num.sum() / den.sum()).item(), ratios)


def paired_difference(a: torch.Tensor, b: torch.Tensor, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> Estimate:
    """mean(a) - mean(b) of two [seeds, prompts] tables on the same seeds and prompts (a row of b may be shared by
    every seed: b of shape [1, prompts], e.g. the aligned model before any fine-tune), with a paired bootstrap."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64).expand_as(a)
    return bootstrap_mean(a - b, reps, seed)


def _estimate(value: float, draws: torch.Tensor) -> Estimate:
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Estimate(value, low, high)


# ---------------------------------------------------------------- a judge's measured error
#
# Every rate is a count of a refusal judge's verdicts. When the judge disagrees with hand labels
# (python -m minisafe.judge_check) on a share e of one kind of response (malicious, normal or over-rejection
# prompts), up to e * n of the n verdicts behind a rate of that kind may be wrong, all in one direction in the
# worst case, so the rate may be off by up to e. The rule: where the judge agrees on less than
# JUDGE_AGREEMENT_TARGET of a kind, each bound of a rate's interval on that kind moves out by e, clipped to [0, 1].

JUDGE_AGREEMENT_TARGET = 0.95


def judge_margin(agreement: float, target: float = JUDGE_AGREEMENT_TARGET) -> float:
    """How far to widen a rate's bounds for a judge that agrees with the labels on `agreement` of that kind of
    response: its disagreement 1 - agreement when agreement is below `target`, else 0."""
    if not 0 <= agreement <= 1:
        raise ValueError(f"agreement must be a share in [0, 1], got {agreement}")
    return 1 - agreement if agreement < target else 0.0


def widened_interval(low: float, high: float, margin: float) -> tuple[float, float]:
    """[low - margin, high + margin] clipped to [0, 1]: an interval widened by a judge's disagreement rate."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return max(0.0, low - margin), min(1.0, high + margin)
