"""The unlearning statistics against hand-computed values and the field's libraries (scipy's
KS test and harmonic mean, rouge_score's ROUGE-L, the ROC AUC by counting pairs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy import stats as scipy_stats

from compress_unlearn import stats

IGNORE = -100


def test_token_log_probs_and_hits_follow_the_shifted_labels():
    logits = torch.log(torch.tensor([[[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]]]))
    labels = torch.tensor([[IGNORE, 0, 0, 1]])
    (values,) = stats.token_log_probs(logits, labels)
    assert values.tolist() == pytest.approx([math.log(0.7), math.log(0.4), math.log(0.1)], rel=1e-6)
    (hits,) = stats.teacher_forced_hits(logits, labels)
    # argmax 0, 1, 0 against labels 0, 0, 1; the last scored token is left out
    assert hits.tolist() == [True, False]


def test_truth_ratio_is_the_geometric_mean_of_wrong_over_the_paraphrase():
    correct = np.array([1.0, 2.0])
    wrong = np.array([[1.0, 3.0], [0.5, 0.5]])
    ratios = stats.truth_ratios(correct, wrong)
    expected = [math.sqrt(math.exp(-1) * math.exp(-3)) / math.exp(-1), math.exp(-0.5) / math.exp(-2)]
    assert ratios.tolist() == pytest.approx(expected, rel=1e-8)
    assert stats.aggregate_truth_ratio(ratios, "closer_to_1_better") == pytest.approx(
        (expected[0] + 1 / expected[1]) / 2, rel=1e-8
    )
    assert stats.aggregate_truth_ratio(ratios, "true_better") == pytest.approx((1 - expected[0] + 0) / 2, rel=1e-8)


def test_normalised_probability_by_hand():
    value = stats.normalised_probability(np.array([math.log(2)]), np.array([[math.log(4), math.log(4)]]))
    assert value == pytest.approx(0.5 / (0.5 + 0.25 + 0.25), rel=1e-8)


def test_forget_quality_is_scipy_ks_p_value():
    rng = np.random.default_rng(0)
    ours, theirs = rng.random(30), rng.random(40) ** 2
    assert stats.ks_pvalue(ours, theirs) == scipy_stats.ks_2samp(ours, theirs).pvalue
    assert stats.ks_pvalue(ours, ours) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("hits", "expected"),
    [
        ([True, True, True, True], 1.0),
        ([False, True, True, True], 0.75),  # right from position 1 on: 1 - 1/4
        ([True, False, True, False], 0.25),  # last wrong: open-unlearning's loop stops at k = L - 1
        ([False, False, False, False], 0.25),
        ([], 0.0),
    ],
)
def test_extraction_strength(hits, expected):
    assert stats.extraction_strength(torch.tensor(hits, dtype=torch.bool)) == pytest.approx(expected)


def test_exact_memorization_is_the_hit_fraction():
    assert stats.exact_memorization(torch.tensor([True, False, True, True])) == 0.75


def test_min_k_averages_the_lowest_fraction_without_the_last_token():
    values = torch.tensor([-1.0, -4.0, -2.0, -3.0, -0.5, -100.0])  # the last (end of sequence) is dropped
    assert stats.min_k_score(values, 0.4) == pytest.approx((4.0 + 3.0) / 2)  # int(5 * 0.4) = 2 lowest
    assert stats.min_k_score(values, 0.1) == pytest.approx(4.0)  # at least one


def test_membership_auc_counts_pairs_with_ties_half():
    forget = [0.1, 0.4, 0.35]
    holdout = [0.8, 0.4, 0.2]
    # holdout items are positives: pairs (h > f) count 1, ties 1/2
    pairs = sum(1.0 if h > f else 0.5 if h == f else 0.0 for h in holdout for f in forget)
    assert stats.membership_auc(forget, holdout) == pytest.approx(pairs / 9)
    assert stats.membership_auc([0.0, 0.1], [1.0, 2.0]) == 1.0


def test_privacy_leak_is_relative_to_the_retain_auc():
    assert stats.privacy_leak(0.5, 0.5) == pytest.approx(0.0, abs=1e-6)
    assert stats.privacy_leak(0.2, 0.5) == pytest.approx((0.8 - 0.5) / 0.5 * 100, rel=1e-6)
    assert stats.privacy_leak(0.9, 0.6) == pytest.approx((0.1 - 0.4) / 0.4 * 100, rel=1e-6)


def test_rouge_l_matches_rouge_score_and_a_hand_lcs():
    answer, generated = "the cat sat on the mat", "a cat sat upon the mat today"
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(answer, generated)["rougeL"]
    assert stats.rouge_l(generated, answer, "recall") == expected.recall == pytest.approx(4 / 6)  # cat sat the mat
    assert stats.rouge_l(generated, answer, "f1") == pytest.approx(expected.fmeasure)


def test_harmonic_mean():
    assert stats.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))
    assert stats.harmonic_mean([0.5, 0.0]) == 0.0
