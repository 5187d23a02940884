"""Per-item statistics of the unlearning metrics, as open-unlearning defines them
(``src/evals/metrics/{memorization,privacy,utility,utils}.py`` and ``mia/min_k.py``).

The functions here work on tensors and lists; :mod:`compress_unlearn.metrics` runs the
models to get them. Conventions taken from open-unlearning:

- answer probability and truth ratio score every answer token (the end-of-sequence token
  included), as ``evaluate_probability`` does;
- extraction strength, exact memorization and Min-K score every answer token but the last
  (``tokenwise_logprobs`` drops the end-of-sequence prediction);
- a ratio guards its divisor with ``+ 1e-10``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
EPSILON = 1e-10


def token_log_probs(logits: Tensor, labels: Tensor) -> list[Tensor]:
    """Each sequence's log-probabilities of its scored next tokens, in order (float32)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return [row[mask] for row, mask in zip(picked, scored)]


def teacher_forced_hits(logits: Tensor, labels: Tensor) -> list[Tensor]:
    """Per sequence, whether the argmax prediction equals each scored next token but the last."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return [(p[m] == t[m])[:-1] for p, t, m in zip(predictions, targets, scored)]


def average_nll(token_lp: Tensor) -> float:
    """Mean negative log-likelihood of one answer's tokens (exp(−it) is TOFU's answer probability)."""
    return float(-token_lp.mean())


def truth_ratios(correct_nll: np.ndarray, wrong_nll: np.ndarray) -> np.ndarray:
    """TOFU's truth ratio per item, R = P_wrong / P_correct: ``correct_nll`` [N] the paraphrased
    answer's average NLL, ``wrong_nll`` [N, K] the perturbed answers'; P_wrong = exp(−mean_k
    nll_k), the geometric mean of their probabilities."""
    return np.exp(-wrong_nll.mean(axis=1)) / (np.exp(-correct_nll) + EPSILON)


def aggregate_truth_ratio(ratios: np.ndarray, aggregator: str) -> float:
    """``closer_to_1_better`` (forget data): mean min(R, 1/R); ``true_better`` (kept data): mean max(0, 1 − R)."""
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(ratios, 1 / (ratios + EPSILON))))
    return float(np.mean(np.maximum(0, 1 - ratios)))


def normalised_probability(correct_nll: np.ndarray, wrong_nll: np.ndarray) -> float:
    """Mean of P_c / (P_c + Σ_k P_k + 1e-10), P = exp(−average NLL): TOFU's ``Prob_normalised``."""
    correct = np.exp(-correct_nll)
    wrong = np.exp(-wrong_nll).sum(axis=1)
    return float(np.mean(correct / (correct + wrong + EPSILON)))


def ks_pvalue(ratios: np.ndarray, reference: np.ndarray) -> float:
    """Forget quality: the two-sample Kolmogorov–Smirnov p-value between two models' truth ratios."""
    from scipy import stats

    return float(stats.ks_2samp(ratios, reference).pvalue)


def extraction_strength(hits: Tensor) -> float:
    """1 − k*/L, k* the first position from which every remaining prediction is right.

    As open-unlearning's loop over k stops at L − 1, k* is at most L − 1: an answer with its
    last token wrong scores 1/L, not 0."""
    length = hits.numel()
    if length == 0:
        return 0.0
    wrong = (~hits).nonzero()
    first = 0 if wrong.numel() == 0 else min(int(wrong[-1]) + 1, length - 1)
    return 1 - first / length


def exact_memorization(hits: Tensor) -> float:
    """The fraction of answer tokens the model predicts exactly (teacher-forced argmax)."""
    return float(hits.float().mean()) if hits.numel() else 0.0


def min_k_score(token_lp: Tensor, k: float) -> float:
    """Min-K% Prob (Shi et al. 2024): minus the mean of the lowest ``k`` fraction (at least one) of the
    answer's token log-probabilities, the last token excluded; higher = less likely a member."""
    values = np.sort(token_lp[:-1].float().cpu().numpy())
    if values.size == 0:
        return 0.0
    return float(-values[: max(1, int(values.size * k))].mean())


def membership_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with holdout items as positives and forget items as negatives (open-unlearning's
    convention: 1 when forget items look far more likely than held-out ones), as the Mann–Whitney
    U statistic over n_holdout·n_forget, ties counted half (= ``sklearn.metrics.roc_auc_score``)."""
    from scipy import stats

    result = stats.mannwhitneyu(holdout_scores, forget_scores, alternative="two-sided")
    return float(result.statistic / (len(holdout_scores) * len(forget_scores)))


def privacy_leak(auc: float, reference_auc: float) -> float:
    """privleak = ((1 − AUC) − (1 − AUC_ret)) / (1 − AUC_ret + 1e-10) × 100: 0 for the retain model's
    AUC, negative when forget items look more like members than the retain model says."""
    return ((1 - auc) - (1 - reference_auc)) / (1 - reference_auc + EPSILON) * 100


def rouge_l(generated: str, answer: str, kind: str) -> float:
    """ROUGE-L of a generation against the answer, with the Porter stemmer: ``recall`` (TOFU) or ``f1`` (MUSE)."""
    from rouge_score import rouge_scorer

    score = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(answer, generated)["rougeL"]
    return score.recall if kind == "recall" else score.fmeasure


def harmonic_mean(values: Sequence[float]) -> float:
    """scipy's harmonic mean (0 when any value is 0), TOFU's model utility over its statistics."""
    from scipy import stats

    return float(stats.hmean(values))
