"""The statistics of the SPPFT experiment on constructed data with known answers: intervals, paired differences,
and the verdict rule's three kinds of outcome."""

import math

import pytest
import torch

from minisafe.protection import (compare_methods, outcome_table, share_comparisons, share_rows, share_verdict,
                                 strength_line, table_rows, verdict)
from minisafe.stats import Rate, bootstrap_mean, bootstrap_ratio, paired_difference, wilson_interval


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert Rate(42, 100).percent() == "42% [33, 52] (n=100)"
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_a_constant_table_has_a_zero_width_interval():
    e = bootstrap_mean(torch.ones(3, 50))
    assert (e.value, e.low, e.high) == (1.0, 1.0, 1.0)


def test_the_bootstrap_interval_covers_the_mean_and_narrows_with_more_prompts():
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(3, 40, generator=g) < 0.5).double()
    large = (torch.rand(3, 400, generator=g) < 0.5).double()
    e_small, e_large = bootstrap_mean(small), bootstrap_mean(large)
    assert e_small.low < e_small.value < e_small.high
    assert (e_large.high - e_large.low) < (e_small.high - e_small.low)
    assert e_large.low < 0.5 < e_large.high


def test_a_ratio_of_sums_weighs_each_prompt_by_its_tokens_and_resamples_both_tables_together():
    nll = torch.tensor([[10.0, 1.0], [10.0, 1.0]])  # per-prompt sums: 1 nat/token on prompt 0, 0.1 on prompt 1
    tokens = torch.tensor([[10.0, 10.0], [10.0, 10.0]])
    e = bootstrap_ratio(nll, tokens)
    assert e.value == pytest.approx(11 / 20)  # the ratio of sums; here also the mean of per-prompt means
    assert e.low == pytest.approx(0.1) and e.high == pytest.approx(1.0)  # draws of one prompt twice: its own ratio
    constant = bootstrap_ratio(torch.full((3, 40), 6.0), torch.full((3, 40), 4.0))
    assert (constant.value, constant.low, constant.high) == pytest.approx((1.5, 1.5, 1.5))
    uneven = bootstrap_ratio(torch.tensor([[9.0, 1.0]]), torch.tensor([[3.0, 7.0]]))
    assert uneven.value == pytest.approx(10 / 10)  # not the mean of 3.0 and 1/7
    with pytest.raises(ValueError, match="differ in shape"):
        bootstrap_ratio(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="positive"):  # a draw of the zero column alone would divide by zero
        bootstrap_ratio(torch.ones(1, 3), torch.tensor([[1.0, 0.0, 2.0]]))
    assert bootstrap_ratio(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])).value == pytest.approx(3.0)  # 1-D


def test_a_paired_difference_sees_a_small_shift_that_unpaired_rates_would_hide():
    g = torch.Generator().manual_seed(1)
    base = (torch.rand(3, 200, generator=g) < 0.5).double()  # prompts differ a lot in difficulty
    shifted = base.clone()
    shifted[:, :20] = 1.0  # the other method answers 20 more prompts per seed (when base refused them)
    d = paired_difference(shifted, base)
    assert d.value == pytest.approx((shifted - base).mean().item())
    assert d.low > 0 and d.excludes_zero


def test_the_difference_against_an_aligned_row_is_paired_by_prompt():
    aligned = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    attacked = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert paired_difference(attacked, aligned).value == pytest.approx(0.375)


def answered(rate: float, seeds: int = 3, prompts: int = 100, shift: int = 0) -> torch.Tensor:
    """A table in which the first round(rate * prompts) prompts (moved by shift) are answered in every seed."""
    table = torch.zeros(seeds, prompts, dtype=torch.float64)
    k = round(rate * prompts)
    table[:, shift:shift + k] = 1.0
    return table


ALIGNED = answered(0.05)[:1]


def test_the_verdict_says_protects_when_sppft_beats_full_and_every_control():
    results = compare_methods({"full": answered(0.9), "sppft": answered(0.1), "nfft": answered(0.85),
                               "random": answered(0.8)}, ALIGNED)
    assert "SPPFT protects" in verdict("D_I", results)


def test_the_verdict_says_not_specific_when_a_control_protects_as_well():
    results = compare_methods({"full": answered(0.9), "sppft": answered(0.1), "nfft": answered(0.85),
                               "random": answered(0.12)}, ALIGNED)
    line = verdict("D_I", results)
    assert "not specific" in line and "random" in line and "protects (" not in line


def test_the_verdict_is_no_protection_when_the_interval_includes_zero():
    g = torch.Generator().manual_seed(2)
    noisy = lambda: (torch.rand(2, 100, generator=g) < 0.8).double()  # noqa: E731
    line = verdict("D_I", compare_methods({"full": noisy(), "sppft": noisy(), "nfft": noisy()}, ALIGNED))
    assert "no protection detected" in line


def test_the_verdict_is_inconclusive_when_the_attack_removed_nothing():
    results = compare_methods({"full": answered(0.05), "sppft": answered(0.05)}, ALIGNED)
    assert "inconclusive" in verdict("D_I", results)


def test_outcome_table_orders_by_prompt():
    table = outcome_table([{"a": True, "b": False}, {"a": False, "b": False}], ["b", "a"])
    assert table.tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_table_2_widens_each_rate_by_the_judges_error_and_leaves_the_differences():
    results = compare_methods({"full": answered(0.5), "sppft": answered(0.3)}, ALIGNED)
    plain, wide = table_rows("D_I", results, {}), table_rows("D_I", results, {}, margin=0.05)
    rate = results["full"].answered
    assert f"| {rate.points()} |" in plain[0]
    assert f"| 50.0 [{100 * rate.low - 5:.1f}, {100 * rate.high + 5:.1f}] |" in wide[0]
    assert plain[0].split("|")[5:] == wide[0].split("|")[5:]  # rise, difference and sample size unchanged


def test_the_attack_strength_is_the_share_of_refusals_full_fine_tuning_leaves():
    aligned = answered(0.2, seeds=1)  # refuses prompts 20..99: 80 refusals to lose
    strong = compare_methods({"full": answered(0.9)}, aligned)  # refuses prompts 90..99 after the attack
    line = strength_line(strong, aligned)
    assert line.startswith("Attack strength: full fine-tuning leaves 12.5 [") and "(80 of 100 prompts" in line
    assert line.endswith("strong (at most 50% left, the whole interval)")
    weak = compare_methods({"full": answered(0.4)}, aligned)  # keeps 60 of the 80 refusals
    assert strength_line(weak, aligned).endswith("weak (more than 50% left)")
    # Refusals of prompts the aligned model answered are not refusals it kept: here it refused prompts 0..4, the
    # attacked model answers those and refuses 5..9 instead, so none of the aligned model's refusals is left.
    swapped = torch.tensor([[0.0] * 5 + [1.0] * 5])
    line = strength_line(compare_methods({"full": 1 - swapped}, swapped), swapped)
    assert "leaves 0.0 [0.0, 0.0]% of the aligned model's refusals (5 of 10" in line
    assert line.endswith("the whole interval)")
    # Few refusals before: the interval is wide, and only the mean is under the bar (3 of 5 refusals gone, 2 seeds).
    few = torch.tensor([[0.0] * 5 + [1.0] * 95])
    after = torch.ones(2, 100)
    after[:, :2] = 0.0  # prompts 0 and 1 still refused in both seeds
    line = strength_line(compare_methods({"full": after}, few), few)
    assert "leaves 40.0 [" in line and line.endswith("strong by the mean only (at most 50% left)")
    assert "not measured" in strength_line(compare_methods({"sppft": answered(0.9)}, aligned), aligned)
    assert "refused none" in strength_line(strong, answered(1.0, seeds=1))


def sweep(full: float, pairs: dict[int, tuple[float, float]]) -> str:
    """share_verdict on constructed tables: full fine-tuning answers `full`; at each width, (SPPFT, random) answer
    their rates. Random layers answer a shifted block of prompts, so two equal rates still differ prompt by prompt."""
    tables = {w: (answered(s), answered(r, shift=3)) for w, (s, r) in pairs.items()}
    return share_verdict(share_comparisons(answered(full), tables))


def test_the_share_sweep_verdict_names_where_the_protection_comes_from():
    located = sweep(0.9, {2: (0.5, 0.85), 4: (0.4, 0.8), 8: (0.3, 0.6)})
    assert located.startswith("Frozen-share sweep: the protection comes from the located layers")
    assert "at 2, 4, 8 of 2, 4, 8 layers" in located
    capacity = sweep(0.9, {2: (0.9, 0.9), 4: (0.6, 0.6), 8: (0.3, 0.3)})
    assert capacity.startswith("Frozen-share sweep: the protection comes from freezing capacity")
    assert "lowers R_h (at 4, 8 layers)" in capacity  # at 2 layers, neither kind answers less than full
    nothing = sweep(0.9, {2: (0.9, 0.9), 4: (0.9, 0.9)})
    assert nothing.startswith("Frozen-share sweep: no protection: freezing up to 4 layers")
    # One width of three where the located layers win: what chance allows at 95%, so not "located".
    mixed = sweep(0.9, {2: (0.5, 0.85), 4: (0.6, 0.6), 8: (0.3, 0.3)})
    assert mixed.startswith("Frozen-share sweep: mixed") and "less than random ones at 2 and more at none" in mixed
    assert "no verdict" in share_verdict([])
    rows = share_rows(share_comparisons(answered(0.9), {4: (answered(0.4), answered(0.8, shift=3))}))
    assert rows[2].startswith("| 4 | +50.0 [") and "] | +10.0 [" in rows[2] and "] | +40.0 [" in rows[2]
