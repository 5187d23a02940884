"""The distillation losses: divergence properties, closed forms worked by hand, masking,
the JSD endpoints, PLD's translation invariance, AlphaNet's surrogate gradient, the sparse
teacher and the temperature convention."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from compress.errors import UserError
from compress_distill.losses import (
    LOSSES,
    DualHead,
    HiddenProjection,
    adaptive_alpha_divergence,
    alpha_divergence,
    bdkd,
    dhkd,
    forward_kl,
    jsd,
    layer_map,
    lookup_loss,
    pld,
    reverse_kl,
    sinkhorn,
    skew_forward_kl,
    skew_reverse_kl,
    top_k_logits,
    total_variation,
)

LOGIT_LOSSES = [name for name, spec in LOSSES.items() if spec.inputs != "hidden"]
# Divergences between the two softmax distributions: zero exactly at equal distributions.
DISTRIBUTION_DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "alpha_divergence",
    "adaptive_alpha",
    "bdkd",
]
# Losses that treat every counted position on its own (sinkhorn couples them).
PER_POSITION = [name for name in LOSSES if name != "sinkhorn"]


def logits_of(*probabilities: float) -> torch.Tensor:
    """Logits (log-probabilities) of one position's distribution, shape [1, classes]."""
    return torch.tensor([probabilities]).log()


def pair(seed: int, shape: tuple[int, ...] = (3, 5, 11), scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator), scale * torch.randn(shape, generator=generator)


def close(a: torch.Tensor | float, b: torch.Tensor | float, tol: float = 1e-5) -> bool:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= tol * (1 + abs(b))


# --- divergence properties -----------------------------------------------------------------


@pytest.mark.parametrize("name", DISTRIBUTION_DIVERGENCES)
def test_zero_exactly_at_equal_distributions_positive_elsewhere(name):
    function = LOSSES[name].function
    for seed in range(5):
        student, teacher = pair(seed)
        assert function(student, teacher) > 1e-4
        same = function(teacher, teacher)
        shifted = function(teacher + torch.randn(3, 5, 1), teacher)  # same distributions, other logits
        assert abs(float(same)) < 1e-6 and abs(float(shifted)) < 1e-6


def test_dhkd_is_zero_exactly_at_equal_logits():
    student, teacher = pair(0)
    assert dhkd(teacher, teacher) == 0
    assert dhkd(teacher + 1.0, teacher) > 0.1  # the offset softmax cannot see
    assert dhkd(student, teacher) > 0.1


@pytest.mark.parametrize("name", ["pld", "sinkhorn"])
def test_ranking_and_transport_losses_are_non_negative(name):
    for seed in range(5):
        student, teacher = pair(seed)
        assert LOSSES[name].function(student, teacher) >= 0


def test_sinkhorn_at_equal_distributions_vanishes_with_the_regularization():
    """The entropic blur keeps it above zero; as epsilon -> 0 the plan becomes the identity."""
    _, teacher = pair(1, (6, 11), scale=3.0)
    blurred = sinkhorn(teacher, teacher, epsilon=1.0, iterations=100)
    sharp = sinkhorn(teacher, teacher, epsilon=0.005, iterations=200)
    assert 0 <= sharp < 1e-4 < blurred
    assert sinkhorn(*pair(2, (6, 11), scale=3.0), epsilon=0.005, iterations=200) > 0.1


# --- closed forms, worked by hand ----------------------------------------------------------

# Two classes: teacher p = (0.8, 0.2), student q = (0.5, 0.5).
P2, Q2 = logits_of(0.8, 0.2), logits_of(0.5, 0.5)
FKL2 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
RKL2 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)


def test_two_class_closed_forms():
    assert close(forward_kl(Q2, P2), FKL2)
    assert close(reverse_kl(Q2, P2), RKL2)
    assert close(total_variation(Q2, P2), 0.3)
    # M = (0.65, 0.35)
    js = 0.5 * (0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.2 / 0.35)) + 0.5 * (
        0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.5 / 0.35)
    )
    assert close(jsd(Q2, P2, beta=0.5), js)
    # 0.1 p + 0.9 q = (0.53, 0.47); 0.9 p + 0.1 q = (0.77, 0.23)
    assert close(skew_forward_kl(Q2, P2, alpha=0.1), 0.8 * math.log(0.8 / 0.53) + 0.2 * math.log(0.2 / 0.47))
    assert close(skew_reverse_kl(Q2, P2, alpha=0.1), 0.5 * math.log(0.5 / 0.77) + 0.5 * math.log(0.5 / 0.23))
    # D_alpha(p || q) = (sum p^a q^(1-a) - 1) / (a (a - 1))
    half = -4 * (math.sqrt(0.8 * 0.5) + math.sqrt(0.2 * 0.5) - 1)
    chi = 0.5 * (0.5**2 / 0.8 + 0.5**2 / 0.2 - 1)
    assert close(alpha_divergence(Q2, P2, alpha=0.5), half)
    assert close(alpha_divergence(Q2, P2, alpha=-1.0), chi)
    assert close(alpha_divergence(Q2, P2, alpha=1.0), FKL2)
    assert close(alpha_divergence(Q2, P2, alpha=0.0), RKL2)
    assert close(adaptive_alpha_divergence(Q2, P2), max(chi, FKL2))
    # H(q) = log 2 > H(p) = 0.500: the student is less sure, reverse KL is boosted.
    assert close(bdkd(Q2, P2, boost=3.0), 3 * RKL2 + FKL2)
    assert close(bdkd(P2, Q2, boost=3.0), FKL2 + 3 * RKL2)  # roles swapped: the student is surer
    # One position: the plan is the single point, the cost its L1 distance.
    assert close(sinkhorn(Q2, P2), 0.6)


def test_three_class_closed_forms():
    p, q = (0.7, 0.2, 0.1), (0.2, 0.5, 0.3)
    teacher, student = logits_of(*p), logits_of(*q)
    assert close(forward_kl(student, teacher), sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert close(reverse_kl(student, teacher), sum(b * math.log(b / a) for a, b in zip(p, q)))
    assert close(total_variation(student, teacher), 0.5)
    m = [0.3 * a + 0.7 * b for a, b in zip(p, q)]
    expected = 0.3 * sum(a * math.log(a / c) for a, c in zip(p, m))
    expected += 0.7 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert close(jsd(student, teacher, beta=0.3), expected)
    assert close(alpha_divergence(student, teacher, alpha=2.0), 0.5 * (sum(a * a / b for a, b in zip(p, q)) - 1))


def test_pld_closed_forms():
    # Two classes, label 0 = the teacher's top class: only the first choice costs anything.
    student, teacher = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    w0 = math.exp(2) / (math.exp(2) + 1)
    assert close(pld(student, teacher, labels=torch.tensor([0])), w0 * (math.log(math.e + math.e**3) - 1))
    # Label 1 goes first although the teacher prefers 0.
    assert close(pld(student, teacher, labels=torch.tensor([1])), (1 - w0) * (math.log(math.e + math.e**3) - 3))
    # Three classes, label 1: ranking (1, 0, 2) - the label, then teacher order 0 (3.0) before 2 (2.0).
    student, teacher = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]])
    z = math.exp(3) + math.exp(1) + math.exp(2)
    w = [math.exp(3) / z, math.exp(1) / z, math.exp(2) / z]
    expected = w[1] * (math.log(1 + math.e + math.e**2) - 1) + w[0] * math.log(1 + math.e**2)
    assert close(pld(student, teacher, labels=torch.tensor([1])), expected)
    # Without labels the teacher's order alone: (0, 2, 1).
    expected = w[0] * (math.log(1 + math.e + math.e**2) - 0) + w[2] * (math.log(math.e**2 + math.e) - 2)
    assert close(pld(student, teacher), expected)
    assert close(pld(student, teacher, labels=torch.tensor([-100])), expected)


def test_pld_temperature_softens_only_the_teacher_weights():
    """The paper's appendix: raw student log-likelihood, weights softmax(t / T), no T**2."""
    student, teacher = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    w0 = math.e / (math.e + 1)  # softmax([2, 0] / 2)[0]
    assert close(
        pld(student, teacher, temperature=2.0, labels=torch.tensor([0])), w0 * (math.log(math.e + math.e**3) - 1)
    )
    # three classes, label 1, T = 2: ranking (1, 0, 2), weights softmax([1.5, 0.5, 1.0])
    student, teacher = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]])
    z = math.exp(1.5) + math.exp(0.5) + math.exp(1.0)
    expected = math.exp(0.5) / z * (math.log(1 + math.e + math.e**2) - 1) + math.exp(1.5) / z * math.log(1 + math.e**2)
    assert close(pld(student, teacher, temperature=2.0, labels=torch.tensor([1])), expected)


def test_dhkd_closed_form():
    # Per class KL(Bernoulli(1/2) || Bernoulli(sigmoid(gap / T))), summed; T**2 in front.
    student, teacher = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.0, 0.0, 0.5]])

    def kl_from_half(gap: float) -> float:
        s = 1 / (1 + math.exp(-gap))
        return 0.5 * math.log(0.5 / s) + 0.5 * math.log(0.5 / (1 - s))

    assert close(dhkd(student, teacher), 2 * kl_from_half(1.0))
    assert close(dhkd(student, teacher, temperature=2.0), 4 * 2 * kl_from_half(0.5))


# --- masking, endpoints, invariances ---------------------------------------------------------


@pytest.mark.parametrize("name", [*PER_POSITION, "sinkhorn"])
def test_masking_equals_filtering(name):
    function = LOSSES[name].function
    student, teacher = pair(3, (4, 6, 9))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)) > 0.4
    masked = function(student, teacher, mask=mask)
    filtered = function(student[mask], teacher[mask])
    assert close(masked, filtered)
    assert function(student, teacher, mask=torch.zeros(4, 6, dtype=torch.bool)) == 0


def test_padding_garbage_does_not_leak_through_the_mask():
    student, teacher = pair(5, (2, 4, 7))
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    student[~mask] = torch.nan
    for name in LOGIT_LOSSES:
        assert torch.isfinite(LOSSES[name].function(student, teacher, mask=mask)), name


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher = pair(6)
    assert jsd(student, teacher, beta=0.0) == forward_kl(student, teacher)
    assert jsd(student, teacher, beta=1.0) == reverse_kl(student, teacher)
    # ...which are the limits of JSD(beta) / beta and JSD(beta) / (1 - beta).
    eps = 1e-4
    assert close(jsd(student, teacher, beta=eps) / eps, forward_kl(student, teacher), tol=1e-2)
    assert close(jsd(student, teacher, beta=1 - eps) / eps, reverse_kl(student, teacher), tol=1e-2)


def test_skew_kls_without_skew_are_the_kls():
    student, teacher = pair(7)
    assert close(skew_forward_kl(student, teacher, alpha=0.0), forward_kl(student, teacher))
    assert close(skew_reverse_kl(student, teacher, alpha=0.0), reverse_kl(student, teacher))


def test_pld_is_invariant_to_adding_a_constant_to_the_logits():
    student, teacher = pair(8)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(9))
    reference = pld(student, teacher, labels=labels)
    shift = 10 * torch.randn(3, 5, 1)
    assert close(pld(student + shift, teacher, labels=labels), reference)
    assert close(pld(student, teacher - shift, labels=labels), reference)
    assert close(pld(student + 7.0, teacher + 3.0, labels=labels), reference)


# --- AlphaNet's surrogate gradient -----------------------------------------------------------


def true_alpha_divergence(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_alpha(p || q) per position, straight from the definition (autograd differentiates it)."""
    q, p = log_q.exp(), log_p.exp()
    if alpha == 1.0:
        return (p * (log_p - log_q)).sum(-1)
    if alpha == 0.0:
        return (q * (log_q - log_p)).sum(-1)
    return ((p**alpha * q ** (1 - alpha)).sum(-1) - 1) / (alpha * (alpha - 1))


def gradient(loss: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, student)[0]


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_alphanet_surrogate_gradient_equals_the_true_gradient_before_clipping(alpha):
    student, teacher = pair(10)
    student.requires_grad_(True)
    ours = alpha_divergence(student, teacher, alpha=alpha, clip=math.inf, temperature=2.0)
    log_q, log_p = (student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1)
    truth = 4 * true_alpha_divergence(log_q, log_p, alpha).mean()
    assert close(ours, truth)
    torch.testing.assert_close(gradient(ours, student), gradient(truth, student), rtol=1e-4, atol=1e-6)


def test_adaptive_alpha_gradient_equals_the_true_gradient_before_clipping():
    student, teacher = pair(11)
    student.requires_grad_(True)
    ours = adaptive_alpha_divergence(student, teacher, alpha_min=-1.0, alpha_max=1.0, clip=math.inf)
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    truth = torch.maximum(true_alpha_divergence(log_q, log_p, -1.0), true_alpha_divergence(log_q, log_p, 1.0)).mean()
    assert close(ours, truth)
    torch.testing.assert_close(gradient(ours, student), gradient(truth, student), rtol=1e-4, atol=1e-6)


def test_alphanet_clipping_changes_the_gradient_not_the_value():
    student, teacher = pair(12, scale=4.0)
    student.requires_grad_(True)
    exact = alpha_divergence(student, teacher, alpha=-1.0, clip=math.inf)
    clipped = alpha_divergence(student, teacher, alpha=-1.0, clip=1.5)
    assert close(exact, clipped)
    assert gradient(clipped, student).norm() < gradient(exact, student).norm()


def alphanet_adaptive_loss(
    student: torch.Tensor, teacher: torch.Tensor, alpha_min: float, alpha_max: float, clip: float
) -> torch.Tensor:
    """AlphaNet's AdaptiveLossSoft (facebookresearch/AlphaNet, loss_ops.py), rewritten from its formulas:
    per position, f_divergence's clipped value picks the branch and the loss is that branch's surrogate."""

    def f_divergence(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        q = student.softmax(-1).detach()
        log_q = student.log_softmax(-1)
        ratio = teacher.softmax(-1) / q
        if abs(alpha) < 1e-3:
            ratio = ratio.clamp(0, clip)
            f, base, rho = -ratio.log(), 0.0, ratio.log() - 1
        elif abs(alpha - 1) < 1e-3:
            f, base, rho = ratio * ratio.log(), 0.0, ratio
        else:
            weight = ratio.pow(alpha).clamp(0, clip)
            f, base = weight / alpha / (alpha - 1), 1 / alpha / (alpha - 1)
            rho = weight / alpha + base
        return (q * (f - base)).sum(-1), -(q * rho * log_q).sum(-1)

    (left, left_grad), (right, right_grad) = f_divergence(alpha_min), f_divergence(alpha_max)
    return torch.where(left > right, left_grad, right_grad).mean()


@pytest.mark.parametrize(("alpha_min", "alpha_max"), [(-1.0, 1.0), (-0.5, 0.5), (0.0, 2.0)])
def test_adaptive_alpha_gradient_equals_alphanet_code(alpha_min, alpha_max):
    student, teacher = pair(17, (4, 6, 9), scale=4.0)  # wide logits: many weights above the clip
    student.requires_grad_(True)
    ours = adaptive_alpha_divergence(student, teacher, alpha_min=alpha_min, alpha_max=alpha_max, clip=5.0)
    theirs = alphanet_adaptive_loss(student, teacher, alpha_min, alpha_max, clip=5.0)
    torch.testing.assert_close(gradient(ours, student), gradient(theirs, student), rtol=1e-4, atol=1e-6)


def test_adaptive_alpha_chooses_its_branch_on_clipped_values():
    """p = (0.6, 0.399, 0.001), q = (0.9, 0.05, 0.05): D_-1 = 1.43 exceeds D_1 = KL(p || q) = 0.58 only
    through the weight q/p = 50 of the last class; clipped at 5 it is 0.30, so forward KL is the branch."""
    p, q = (0.6, 0.399, 0.001), (0.9, 0.05, 0.05)
    chi = (sum(b * b / a for a, b in zip(p, q)) - 1) / 2
    forward = sum(a * math.log(a / b) for a, b in zip(p, q))
    clipped_chi = sum(b * (min(b / a, 5.0) - 1) for a, b in zip(p, q)) / 2
    assert clipped_chi < forward < chi
    student, teacher = logits_of(*q).requires_grad_(True), logits_of(*p)
    ours = adaptive_alpha_divergence(student, teacher)
    assert close(ours, forward)
    torch.testing.assert_close(gradient(ours, student), gradient(forward_kl(student, teacher), student))
    assert close(adaptive_alpha_divergence(student, teacher, clip=math.inf), chi)  # exact choice: the larger one


# --- sparse teacher, temperature ---------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in LOGIT_LOSSES if name != "dhkd"])
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss(name):
    function = LOSSES[name].function
    student, teacher = pair(13)
    assert close(function(student, top_k_logits(teacher, 11)), function(student, teacher))
    assert close(function(student, top_k_logits(teacher, 50)), function(student, teacher))


def test_top_k_keeps_the_top_probabilities_and_spreads_the_rest():
    _, teacher = pair(14)
    sparse = top_k_logits(teacher, 3).exp()
    full = teacher.softmax(-1)
    top = full.topk(3, dim=-1)
    torch.testing.assert_close(sparse.gather(-1, top.indices), top.values)
    torch.testing.assert_close(sparse.sum(-1), torch.ones(3, 5))
    in_top = torch.zeros_like(sparse, dtype=torch.bool).scatter(-1, top.indices, True)
    rest = (1 - top.values.sum(-1, keepdim=True)) / 8
    torch.testing.assert_close(sparse[~in_top].view(3, 5, 8), rest.expand(3, 5, 8))
    student = torch.randn(3, 5, 11)
    assert torch.isfinite(reverse_kl(student, top_k_logits(teacher, 1)))
    with pytest.raises(UserError, match="top_k"):
        top_k_logits(teacher, 0)


@pytest.mark.parametrize("name", [name for name in LOGIT_LOSSES if name != "pld"])  # pld: its own test above
def test_temperature_scales_the_logits_and_multiplies_by_its_square(name):
    function = LOSSES[name].function
    student, teacher = pair(15)
    assert close(function(student, teacher, temperature=3.0), 9 * function(student / 3, teacher / 3))
    assert close(function(student, teacher, temperature=1.0), function(student, teacher))


# --- helpers and registry -------------------------------------------------------------------


def test_hidden_losses():
    student, teacher = pair(16, (2, 3, 8))
    assert LOSSES["hidden_mse"].function(teacher, teacher) == 0
    assert close(LOSSES["hidden_mse"].function(teacher + 2.0, teacher), 4.0)
    assert close(LOSSES["hidden_cosine"].function(3 * teacher, teacher), 0.0)
    assert close(LOSSES["hidden_cosine"].function(-teacher, teacher), 2.0)
    assert LOSSES["hidden_mse"].function(student, teacher) > 0


def test_layer_map_and_projection():
    assert layer_map(2, 4) == {1: 2, 2: 4}
    assert layer_map(3, 12) == {1: 4, 2: 8, 3: 12}
    hidden = torch.randn(2, 3, 8)
    assert HiddenProjection(8, 8)(hidden) is hidden
    projection = HiddenProjection(8, 16)
    assert projection(hidden).shape == (2, 3, 16) and len(list(projection.parameters())) == 1


def test_dual_head_gives_two_heads_on_one_feature():
    head = DualHead(16, 10)
    main, aux = head(torch.randn(4, 16))
    assert main.shape == aux.shape == (4, 10)
    assert not torch.equal(main, aux)


def test_registry_and_did_you_mean():
    assert set(LOSSES) == {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "alpha_divergence",
        "adaptive_alpha",
        "bdkd",
        "sinkhorn",
        "pld",
        "dhkd",
        "hidden_mse",
        "hidden_cosine",
    }
    common = {"student", "teacher", "mask", "temperature", "labels"}
    for spec in LOSSES.values():
        assert spec.paper and spec.summary
        assert LOSSES[spec.name] is spec
        keywords = set(inspect.signature(spec.function).parameters)
        assert keywords - common == set(spec.params), spec.name  # what a recipe may set
        assert ("labels" in keywords) == spec.uses_labels
        assert ("temperature" in keywords) == (spec.inputs != "hidden")
    assert lookup_loss("jsd").params == ("beta",)
    with pytest.raises(UserError, match="did you mean 'forward_kl'"):
        lookup_loss("forwrd_kl")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("jsd", {"beta": 1.5}, "beta"),
        ("skew_forward_kl", {"alpha": 1.0}, "alpha"),
        ("adaptive_alpha", {"alpha_min": 1.0, "alpha_max": -1.0}, "alpha_min"),
        ("sinkhorn", {"epsilon": 0.0}, "epsilon"),
        ("bdkd", {"boost": 0.5}, "boost"),
    ],
)
def test_bad_parameters_are_user_errors(name, params, message):
    student, teacher = pair(17)
    with pytest.raises(UserError, match=message):
        LOSSES[name].function(student, teacher, **params)
