"""The unlearning losses against hand computations on tiny tensors: NLL sums, NPO's value and its
β → 0 limit (gradient ascent), SimNPO's length normalization and margin, the retain KL, and
DiPO's distribution pairs and loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress_unlearn.losses import (
    dipo_loss,
    distribution_pair,
    gradient_ascent_loss,
    mean_nll,
    npo_loss,
    retain_kl,
    sequence_nll,
    simnpo_loss,
)

IGNORE = -100


def logits_for(probabilities: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is the given next-token distributions."""
    return torch.tensor(probabilities).log()


# two sequences of 3 positions over a vocabulary of 2; labels at positions 1 and 2 (position 0 is a prompt)
PROBS = [[[0.5, 0.5], [0.8, 0.2], [0.9, 0.1]], [[0.5, 0.5], [0.25, 0.75], [0.6, 0.4]]]
LABELS = torch.tensor([[IGNORE, 0, 1], [IGNORE, 1, IGNORE]])
# sequence 0: position 0 predicts label 0 (p 0.5), position 1 predicts label 1 (p 0.2)
# sequence 1: position 0 predicts label 1 (p 0.5); its last label is masked
NLL_0 = -math.log(0.5) - math.log(0.2)
NLL_1 = -math.log(0.5)


def test_sequence_nll_sums_the_scored_answer_tokens():
    total, count = sequence_nll(logits_for(PROBS), LABELS)
    assert total.tolist() == pytest.approx([NLL_0, NLL_1], rel=1e-6)
    assert count.tolist() == [2, 1]
    assert mean_nll(logits_for(PROBS), LABELS).item() == pytest.approx((NLL_0 + NLL_1) / 3, rel=1e-6)


def test_gradient_ascent_is_minus_the_transformers_loss():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, 2], [IGNORE, 4, 4, 0, IGNORE]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert gradient_ascent_loss(logits, labels).item() == pytest.approx(-expected.item(), rel=1e-6)


def test_npo_by_hand():
    ours = logits_for(PROBS)
    reference_probs = [[[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]], [[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]]]
    ref_0 = -math.log(0.5) - math.log(0.1)
    ref_1 = -math.log(0.5)
    beta = 0.5

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = -(2 / beta) * (log_sigmoid(beta * (NLL_0 - ref_0)) + log_sigmoid(beta * (NLL_1 - ref_1))) / 2
    assert npo_loss(ours, logits_for(reference_probs), LABELS, beta).item() == pytest.approx(expected, rel=1e-5)
    # at the reference every sequence contributes (2/β)·log 2
    assert npo_loss(ours, ours, LABELS, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_tends_to_gradient_ascent_on_summed_nll_as_beta_vanishes():
    torch.manual_seed(0)
    reference = torch.randn(3, 6, 5)
    labels = torch.tensor([[IGNORE, 1, 2, 3, 4, 0], [IGNORE, IGNORE, 2, 2, IGNORE, IGNORE], [IGNORE, 0, 0, 1, 1, 1]])
    logits = (reference + 0.3 * torch.randn(3, 6, 5)).requires_grad_()
    (npo_grad,) = torch.autograd.grad(npo_loss(logits, reference, labels, beta=1e-4), logits)
    total, _ = sequence_nll(logits, labels)
    (ascent_grad,) = torch.autograd.grad(-total.mean(), logits)
    torch.testing.assert_close(npo_grad, ascent_grad, rtol=1e-3, atol=1e-6)
    (larger_beta,) = torch.autograd.grad(npo_loss(logits, reference, labels, beta=5.0), logits)
    assert not torch.allclose(larger_beta, ascent_grad, rtol=1e-2, atol=1e-4)


def test_simnpo_normalizes_by_answer_length_and_subtracts_the_margin():
    # sequence 0 has 2 scored tokens of probability 0.5 each, sequence 1 one such token: equal per-token NLL
    probs = [[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]
    beta, delta = 4.5, 0.25
    per_token = math.log(2)
    expected = -(2 / beta) * -math.log1p(math.exp(-beta * (per_token - delta)))
    value = simnpo_loss(logits_for(probs), LABELS, beta, delta)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # unnormalized (NPO-like) sums would differ between the two sequences; per token they do not
    single = simnpo_loss(logits_for(probs[:1]), LABELS[:1], beta, delta)
    assert single.item() == pytest.approx(expected, rel=1e-6)


def test_retain_kl_by_hand_and_blind_to_padding():
    ours = logits_for([[[0.5, 0.5], [0.2, 0.8]]])
    theirs = logits_for([[[0.5, 0.5], [0.6, 0.4]]])
    mask = torch.tensor([[1, 1]])
    expected = (0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)) / 2
    assert retain_kl(ours, theirs, mask).item() == pytest.approx(expected, rel=1e-5)
    padded = torch.cat([ours, torch.randn(1, 1, 2)], dim=1), torch.cat([theirs, torch.randn(1, 1, 2)], dim=1)
    assert retain_kl(*padded, torch.tensor([[1, 1, 0]])).item() == pytest.approx(expected, rel=1e-5)
    assert retain_kl(ours, ours, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_dipo_pairs_move_mass_off_and_onto_the_top_tokens_only():
    torch.manual_seed(1)
    logits = torch.randn(4, 9)
    forgetting, memorizing = distribution_pair(logits, top_k=2, strength=3.0)
    original = logits.softmax(-1)
    top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(2, dim=-1).indices, True)
    torch.testing.assert_close(forgetting.sum(-1), torch.ones(4))
    torch.testing.assert_close(memorizing.sum(-1), torch.ones(4))
    assert (forgetting[top] < original[top]).all() and (original[top] < memorizing[top]).all()
    assert (forgetting[~top] > original[~top]).all() and (original[~top] > memorizing[~top]).all()
    # the other tokens keep their relative probabilities: each pair is one rescaling of the original there
    rest = ~top
    for pair in (forgetting, memorizing):
        ratio = (pair / original)[rest].view(4, -1)
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    # and the top tokens keep theirs, times e^(∓strength) relative to the rest
    torch.testing.assert_close(
        (forgetting / original)[top].view(4, -1) / (forgetting / original)[rest].view(4, -1)[:, :1],
        torch.full((4, 2), math.exp(-3.0)),
    )
    same, also_same = distribution_pair(logits, top_k=2, strength=1e-9)
    torch.testing.assert_close(same, original)
    torch.testing.assert_close(also_same, original)


def test_dipo_loss_is_log_two_at_the_reference_and_pushes_the_top_token_down():
    torch.manual_seed(2)
    reference = torch.randn(2, 4, 6)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 5, 0]])
    logits = reference.clone().requires_grad_()
    value = dipo_loss(logits, reference, labels, beta=0.1, alpha=0.5, top_k=1, strength=5.0)
    assert value.item() == pytest.approx(math.log(2), rel=1e-6)
    (grad,) = torch.autograd.grad(value, logits)
    top = reference[:, :-1].argmax(-1, keepdim=True)
    scored = labels[:, 1:] != IGNORE
    # a descent step lowers each scored position's top logit: the gradient there is positive
    assert (grad[:, :-1].gather(-1, top).squeeze(-1)[scored] > 0).all()
    # positions without a label get no gradient
    assert grad[:, :-1][~scored].abs().max() == 0
    assert grad[:, -1].abs().max() == 0


def test_dipo_reward_by_hand_on_one_position():
    reference = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    logits = torch.tensor([[[1.0, 0.5, -1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 1]])
    beta, strength = 0.1, 2.0
    q_plus = F.softmax(torch.tensor([0.0, 0.0, -1.0]), -1)
    q_minus = F.softmax(torch.tensor([4.0, 0.0, -1.0]), -1)
    ratio = F.log_softmax(logits[0, 0], -1) - F.log_softmax(reference[0, 0], -1)
    expected = -F.logsigmoid(beta * ((q_plus - q_minus) * ratio).sum())
    value = dipo_loss(logits, reference, labels, beta=beta, alpha=0.5, top_k=1, strength=strength)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
