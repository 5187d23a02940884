"""The distillation losses: divergences between student and teacher logits, and hidden-state losses.

Every logit loss takes ``student`` and ``teacher`` logits of shape ``[..., classes]``, an
optional boolean ``mask`` of shape ``[...]`` (broadcastable) naming the positions to
count, and a ``temperature`` T, and returns the mean over the counted positions (a
scalar; 0 when none is counted). Callers turn ignore-index labels into the mask
(``labels != -100``).

Conventions, the same for every loss:

* Temperature: the loss at T is ``T**2 * loss(student / T, teacher / T)`` at T = 1
  (Hinton et al. 2015: the gradients of softened targets shrink as 1/T**2, so the factor
  keeps a loss weight meaningful across temperatures). T = 1 leaves every loss as
  its paper defines it. ``pld`` is the exception, as its paper defines it: T softens only
  the teacher's ranking weights; the student's likelihood uses its raw logits, and there
  is no T**2 factor.
* Direction: "forward" is KL(teacher || student), "reverse" is KL(student || teacher).
* Arithmetic is float32 whatever the logits' dtype.
* The teacher is not differentiated (its logits are detached).
* Zero exactly when the two distributions are equal and positive otherwise: every
  divergence here except ``sinkhorn`` (positive at equality by its entropic blur) and
  ``pld`` (a ranking likelihood, not a divergence); ``dhkd`` compares logits, so it is
  zero exactly when the logits are equal. ``sinkhorn`` couples the counted positions
  (transport between them) instead of averaging a per-position value.

:func:`top_k_logits` makes a sparse teacher: its k largest probabilities exactly, the
rest of the mass spread evenly over the other classes, so every loss stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.api import UserError, did_you_mean

PerPosition = Callable[[Tensor, Tensor], Tensor]


# --- shared plumbing -------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (0 when there are none)."""
    if mask is None:
        return values.mean()
    mask = mask.bool().expand(values.shape)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def _require(condition: bool, loss: str, message: str) -> None:
    if not condition:
        raise UserError(f"distillation loss {loss!r}: {message}")


def _log_probs(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at ``temperature``, float32, teacher detached."""
    return (
        F.log_softmax(student.float() / temperature, dim=-1),
        F.log_softmax(teacher.detach().float() / temperature, dim=-1),
    )


def _divergence(
    per_position: PerPosition, student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float
) -> Tensor:
    """T^2 times the masked mean of ``per_position(log q_student, log p_teacher)``."""
    log_q, log_p = _log_probs(student, teacher, temperature)
    return temperature**2 * masked_mean(per_position(log_q, log_p), mask)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per position, with 0 log 0 = 0 where a has no mass."""
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(log_a == -math.inf, 0.0, terms).sum(-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b)."""
    log_weight = math.log(weight_a) if weight_a > 0 else -math.inf
    return torch.logaddexp(log_a + log_weight, log_b + math.log1p(-weight_a))


def _entropy(log_a: Tensor) -> Tensor:
    return -_kl(log_a, torch.zeros_like(log_a))


# --- sparse teacher --------------------------------------------------------------------


def top_k_logits(teacher: Tensor, k: int) -> Tensor:
    """The teacher's distribution kept only at its ``k`` most likely classes, as log-probabilities.

    The k largest probabilities are kept exactly; the remaining mass ``1 - sum(top k)`` is
    spread evenly over the other ``classes - k`` classes (a tail bucket, the maximum-entropy
    completion) instead of dropped, so reverse KL, negative-alpha divergences and BD-KD stay
    finite where the student puts mass the sparse teacher does not name. The result has the
    teacher's shape and replaces its logits in any loss; with ``k >= classes`` it is the
    teacher's own distribution. Logit-level losses (``dhkd``) compare raw logits, not
    log-probabilities, and should not be given it.
    """
    if k < 1:
        raise UserError(f"top_k must be at least 1, not {k}")
    classes = teacher.shape[-1]
    k = min(k, classes)
    log_p = F.log_softmax(teacher.detach().float(), dim=-1)
    top, index = log_p.topk(k, dim=-1)
    tail_mass = (-torch.expm1(torch.logsumexp(top, dim=-1, keepdim=True))).clamp_min(torch.finfo(top.dtype).tiny)
    tail = tail_mass.log() - math.log(max(classes - k, 1))
    return tail.expand_as(log_p).scatter(-1, index, top)


# --- divergences on probabilities ------------------------------------------------------


def forward_kl(student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student): mass-covering; the classic KD loss (Hinton et al. 2015)."""
    return _divergence(lambda log_q, log_p: _kl(log_p, log_q), student, teacher, mask, temperature)


def reverse_kl(student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM, Gu et al. 2024)."""
    return _divergence(_kl, student, teacher, mask, temperature)


def jsd(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) of GKD (Agarwal et al., ICLR 2024).

    With M = beta * teacher + (1 - beta) * student,
    ``JSD(beta) = beta * KL(teacher || M) + (1 - beta) * KL(student || M)``; beta = 0.5 is
    the usual JSD. The expression itself vanishes at both ends (it behaves like
    ``beta * KL(teacher || student)`` for small beta and ``(1 - beta) * KL(student || teacher)``
    near 1), so, as in GKD's implementation, the endpoints are defined as those limits
    divided by their vanishing factor: beta = 0 is exactly forward KL and beta = 1 exactly
    reverse KL.
    """
    _require(0.0 <= beta <= 1.0, "jsd", f"beta must be in [0, 1], not {beta}")
    if beta == 0.0:
        return forward_kl(student, teacher, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student, teacher, mask, temperature)

    def per_position(log_q: Tensor, log_p: Tensor) -> Tensor:
        log_m = _mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)

    return _divergence(per_position, student, teacher, mask, temperature)


def total_variation(student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|`` (DistiLLM's and f-divergence KD's TVD)."""
    return _divergence(
        lambda log_q, log_p: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), student, teacher, mask, temperature
    )


def skew_forward_kl(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024): ``KL(p || alpha p + (1 - alpha) q)``.

    p is the teacher, q the student; alpha = 0 is forward KL, and the skew bounds the
    loss and its gradient where the student has no mass.
    """
    _require(0.0 <= alpha < 1.0, "skew_forward_kl", f"alpha must be in [0, 1), not {alpha}")
    return _divergence(
        lambda log_q, log_p: _kl(log_p, _mixture(log_p, log_q, alpha)), student, teacher, mask, temperature
    )


def skew_reverse_kl(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., ICML 2024): ``KL(q || (1 - alpha) p + alpha q)``.

    p is the teacher, q the student; alpha = 0 is reverse KL.
    """
    _require(0.0 <= alpha < 1.0, "skew_reverse_kl", f"alpha must be in [0, 1), not {alpha}")
    return _divergence(
        lambda log_q, log_p: _kl(log_q, _mixture(log_q, log_p, alpha)), student, teacher, mask, temperature
    )


@dataclass
class _AlphaTerms:
    """Per position: the alpha-divergence, its value with the importance weight clipped, and
    AlphaNet's surrogate (whose gradient is the clipped gradient)."""

    value: Tensor
    clipped: Tensor
    surrogate: Tensor


def _alpha_terms(log_q: Tensor, log_p: Tensor, alpha: float, clip: float) -> _AlphaTerms:
    """D_alpha(p || q), AlphaNet's clipped value of it and its surrogate (``f_divergence`` in
    AlphaNet's ``loss_ops.py``).

    ``D_alpha(p || q) = sum q f(p / q)`` with ``f(w) = (w^alpha - 1) / (alpha (alpha - 1))``
    (alpha = 1: KL(p || q); alpha = 0: KL(q || p)). Its gradient is
    ``-(1 / alpha) sum q w^alpha grad log q`` (``-sum q log w grad log q`` at alpha = 0), so the
    surrogate ``-sum stopgrad(q rho(w)) log q`` with ``rho(w) = w^alpha / alpha`` has exactly
    that gradient. As AlphaNet's code does, the importance weight ``w^alpha`` (w at alpha = 0)
    is clipped at ``clip`` in the surrogate and in the clipped value, except at alpha = 1,
    where ``q w = p`` is bounded already and nothing is clipped.
    """
    log_w = log_p - log_q
    q = log_q.exp()
    if alpha == 0.0:
        value = _kl(log_q, log_p)
        rho = log_w.clamp_max(math.log(clip))
        clipped = -(q * rho).sum(-1)
    elif alpha == 1.0:
        value = clipped = _kl(log_p, log_q)
        rho = log_w.exp()
    else:
        # q f(w) written as (p^a q^(1-a) - q - a (p - q)) / (a (a - 1)): the added term sums
        # to zero and makes every class's term non-negative (f is convex with f(1) = f'(1) = 0).
        shift = -q - alpha * (log_p.exp() - q)
        scale = alpha * (alpha - 1)
        value = (torch.exp(alpha * log_p + (1 - alpha) * log_q) + shift).sum(-1) / scale
        clipped = (torch.exp((alpha * log_w).clamp_max(math.log(clip)) + log_q) + shift).sum(-1) / scale
        rho = (alpha * log_w).exp().clamp_max(clip) / alpha
    surrogate = -((q * rho).detach() * log_q).sum(-1)
    return _AlphaTerms(value, clipped, surrogate)


def _value_with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient is the surrogate's."""
    return value.detach() + surrogate - surrogate.detach()


def alpha_divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    clip: float = 5.0,
) -> Tensor:
    """Amari alpha-divergence D_alpha(teacher || student) with AlphaNet's clipped gradient.

    Wang et al., "AlphaNet: Improved Training of Supernets with Alpha-Divergence", ICML
    2021. alpha = 1 is forward KL, alpha = 0 reverse KL. The value is the divergence; the
    gradient is AlphaNet's, with the importance weight ``(p / q)^alpha`` clipped at ``clip``
    (``float('inf')`` for the exact gradient; alpha = 1, forward KL, is never clipped).
    """
    _require(clip > 0, "alpha_divergence", f"clip must be positive, not {clip}")

    def per_position(log_q: Tensor, log_p: Tensor) -> Tensor:
        terms = _alpha_terms(log_q, log_p, alpha, clip)
        return _value_with_gradient_of(terms.value, terms.surrogate)

    return _divergence(per_position, student, teacher, mask, temperature)


def adaptive_alpha_divergence(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    clip: float = 5.0,
) -> Tensor:
    """AlphaNet's adaptive alpha-divergence: the larger of D_alpha_min and D_alpha_max at each position.

    Wang et al., ICML 2021. A negative alpha_min penalizes a student that over-estimates
    the teacher's uncertainty, a positive alpha_max one that under-estimates it; taking
    the larger of the two at each position covers both. Defaults are the paper's (-1, 1,
    clip 5). As in AlphaNet's code (``AdaptiveLossSoft``), the larger one is chosen on the
    clipped values (see :func:`_alpha_terms`): with a finite ``clip`` a position whose
    alpha_min divergence is large only through importance weights above the clip takes the
    alpha_max branch. The value is the chosen branch's divergence, unclipped; the gradient
    is its clipped surrogate (see :func:`alpha_divergence`). ``clip: .inf`` chooses on the
    exact divergences.
    """
    _require(alpha_min < alpha_max, "adaptive_alpha", f"alpha_min ({alpha_min}) must be below alpha_max ({alpha_max})")
    _require(clip > 0, "adaptive_alpha", f"clip must be positive, not {clip}")

    def per_position(log_q: Tensor, log_p: Tensor) -> Tensor:
        low, high = _alpha_terms(log_q, log_p, alpha_min, clip), _alpha_terms(log_q, log_p, alpha_max, clip)
        take_low = low.clipped > high.clipped
        return _value_with_gradient_of(
            torch.where(take_low, low.value, high.value), torch.where(take_low, low.surrogate, high.surrogate)
        )

    return _divergence(per_position, student, teacher, mask, temperature)


def bdkd(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0, boost: float = 2.0
) -> Tensor:
    """BD-KD's entropy-balanced mix of forward and reverse KL (Amara et al., arXiv 2212.12965).

    At each position both KLs are summed, and the one that moves the student's entropy
    toward the teacher's is multiplied by ``boost``: reverse KL (mode-seeking, sharpens)
    where the student is less confident than the teacher (higher entropy), forward KL
    (mass-covering, softens) where it is more confident.
    """
    _require(boost >= 1.0, "bdkd", f"boost must be at least 1, not {boost}")

    def per_position(log_q: Tensor, log_p: Tensor) -> Tensor:
        forward, reverse = _kl(log_p, log_q), _kl(log_q, log_p)
        unsure = _entropy(log_q) > _entropy(log_p)
        return torch.where(unsure, boost * reverse + forward, reverse + boost * forward)

    return _divergence(per_position, student, teacher, mask, temperature)


def sinkhorn(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> Tensor:
    """Sinkhorn distance between the batch's student and teacher distributions (SinKD).

    Cui et al., "Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING
    2024, batch-wise formulation. The counted positions' softened distributions form two point clouds of N points each,
    the student's and the teacher's, each point of mass 1/N. The cost between student
    point i and teacher point j is the L1 distance of their distributions; the transport
    plan P is the entropy-regularized optimum (Sinkhorn-Knopp, ``iterations`` rounds in
    log space, regularization ``epsilon``, differentiated through), and the loss is
    ``<P, C>``, the transport cost per point. It is non-negative but, with the entropic
    blur, reaches zero at equal distributions only as epsilon -> 0. The cost matrix takes
    N^2 x classes work: meant for classifier batches or a few thousand positions.
    """
    _require(epsilon > 0, "sinkhorn", f"epsilon must be positive, not {epsilon}")
    _require(iterations >= 1, "sinkhorn", f"iterations must be at least 1, not {iterations}")
    log_q, log_p = _log_probs(student, teacher, temperature)
    if mask is not None:
        keep = mask.bool().expand(log_q.shape[:-1])
        log_q, log_p = log_q[keep], log_p[keep]
    q, p = log_q.exp().flatten(0, -2), log_p.exp().flatten(0, -2)
    points = q.shape[0]
    if points == 0:
        return q.sum()
    cost = torch.cdist(q, p, p=1)
    log_kernel = -cost / epsilon
    log_mass = torch.full((points,), -math.log(points), device=q.device)
    f = torch.zeros_like(log_mass)
    g = torch.zeros_like(log_mass)
    for _ in range(iterations):
        f = log_mass - torch.logsumexp(log_kernel + g[None, :], dim=1)
        g = log_mass - torch.logsumexp(log_kernel + f[:, None], dim=0)
    plan = (log_kernel + f[:, None] + g[None, :]).exp()
    return temperature**2 * (plan * cost).sum()


# --- losses on logits ------------------------------------------------------------------


def pld(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    labels: Tensor | None = None,
) -> Tensor:
    """Plackett-Luce distillation: the student's negative log-likelihood of the teacher's ranking.

    Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", 2025.
    The teacher-optimal ranking puts the true label first (``labels``, shape ``[...]``;
    without labels, or where a label is -100, the teacher's top class) and the other
    classes after it in decreasing teacher logit. The loss is the Plackett-Luce negative
    log-likelihood of that ranking under the student's raw logits ``s``, each choice weighted
    by the teacher's probability of the chosen class at temperature T:
    ``sum_k softmax(t / T)(pi_k) * (logsumexp(s[pi_k:]) - s[pi_k])``, as in the paper's
    appendix: T shapes only the weights (the ranking does not depend on it) and there is no
    T**2 factor. Adding a constant to either model's logits changes nothing; the first term
    is a weighted cross-entropy on the label.
    """
    s = student.float()
    t = teacher.detach().float()
    order_key = t
    if labels is not None:
        first = torch.where(labels == -100, t.argmax(-1), labels).unsqueeze(-1)
        order_key = t.scatter(-1, first, math.inf)
    ranking = order_key.argsort(dim=-1, descending=True)
    ranked = s.gather(-1, ranking)
    weight = (t / temperature).softmax(-1).gather(-1, ranking)
    remaining = ranked.flip(-1).logcumsumexp(-1).flip(-1)
    return masked_mean((weight * (remaining - ranked)).sum(-1), mask)


def dhkd(student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Dual-head KD's logit-level loss BinaryKL-Norm, for the student's auxiliary head.

    Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
    Auxiliary Head", arXiv 2411.08937. ``student`` is the logits of the auxiliary head of a
    :class:`DualHead` classifier (the main head keeps cross-entropy; sharing one head between
    the two losses collapses it). Each class is a Bernoulli variable with probability
    ``sigmoid((s - t) / T)``; the loss is its KL from Bernoulli(1/2), summed over classes
    (the official code's normalized form): zero exactly when the logits are equal, including
    their offset, which softmax losses cannot see. The paper uses T = 2.
    """
    gap = (student.float() - teacher.detach().float()) / temperature
    kl_from_half = -math.log(2.0) - 0.5 * (F.logsigmoid(gap) + F.logsigmoid(-gap))
    return temperature**2 * masked_mean(kl_from_half.sum(-1), mask)


class DualHead(nn.Module):
    """DHKD's classifier: a main head (cross-entropy, used for prediction) and an auxiliary
    head (the ``dhkd`` loss) on the same features."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.main = nn.Linear(in_features, num_classes)
        self.aux = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.main(features), self.aux(features)


# --- hidden states ---------------------------------------------------------------------


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of hidden states ``[..., width]`` (features averaged, then positions)."""
    return masked_mean((student.float() - teacher.detach().float()).pow(2).mean(-1), mask)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``1 - cosine similarity`` of hidden states ``[..., width]``, averaged over positions."""
    return masked_mean(1 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1), mask)


def layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer -> teacher layer, spread evenly, last to last (hidden_states indices,
    0 being the embeddings)."""
    return {layer: round(layer * teacher_layers / student_layers) for layer in range(1, student_layers + 1)}


class HiddenProjection(nn.Module):
    """Maps student hidden states to the teacher's width: identity when equal, else a
    trained linear map (FitNets' regressor, Romero et al. 2015)."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else None

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden if self.linear is None else self.linear(hidden)


# --- registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A loss as recipes name it.

    ``params`` are the keyword parameters a recipe may set besides ``temperature``.
    ``inputs`` says what the function compares: ``logits`` of the two models,
    ``aux_logits`` (the student's auxiliary head against the teacher's logits; classifiers
    with a :class:`DualHead`) or ``hidden`` states (no temperature). ``uses_labels``: the
    function also takes ``labels=`` (shape ``[...]``, -100 where unknown).
    """

    name: str
    function: Callable[..., Tensor]
    paper: str
    params: tuple[str, ...] = ()
    inputs: Literal["logits", "aux_logits", "hidden"] = "logits"
    uses_labels: bool = False

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (self.function.__doc__ or "").strip().splitlines()[0]


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("forward_kl", forward_kl, "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"),
        LossSpec("reverse_kl", reverse_kl, "Gu et al., MiniLLM, ICLR 2024"),
        LossSpec("jsd", jsd, "Agarwal et al., On-Policy Distillation of Language Models (GKD), ICLR 2024", ("beta",)),
        LossSpec("tvd", total_variation, "Wen et al., f-Divergence Minimization for Sequence-Level KD, ACL 2023"),
        LossSpec("skew_forward_kl", skew_forward_kl, "Ko et al., DistiLLM, ICML 2024", ("alpha",)),
        LossSpec("skew_reverse_kl", skew_reverse_kl, "Ko et al., DistiLLM, ICML 2024", ("alpha",)),
        LossSpec("alpha_divergence", alpha_divergence, "Wang et al., AlphaNet, ICML 2021", ("alpha", "clip")),
        LossSpec(
            "adaptive_alpha",
            adaptive_alpha_divergence,
            "Wang et al., AlphaNet, ICML 2021",
            ("alpha_min", "alpha_max", "clip"),
        ),
        LossSpec("bdkd", bdkd, "Amara et al., BD-KD: Balancing the Divergences for Online KD, 2022", ("boost",)),
        LossSpec(
            "sinkhorn",
            sinkhorn,
            "Cui et al., Sinkhorn Distance Minimization for KD, LREC-COLING 2024",
            ("epsilon", "iterations"),
        ),
        LossSpec("pld", pld, "Bassam et al., PLD: A Choice-Theoretic List-Wise KD, arXiv 2506.12542", uses_labels=True),
        LossSpec("dhkd", dhkd, "Yang et al., Dual-Head Knowledge Distillation, arXiv 2411.08937", inputs="aux_logits"),
        LossSpec("hidden_mse", hidden_mse, "Romero et al., FitNets, ICLR 2015", inputs="hidden"),
        LossSpec("hidden_cosine", hidden_cosine, "Sanh et al., DistilBERT (cosine loss), 2019", inputs="hidden"),
    )
}


def lookup_loss(name: str) -> LossSpec:
    """The registered loss called ``name``; a UserError with the closest name otherwise."""
    spec = LOSSES.get(name)
    if spec is None:
        raise UserError(f"unknown distillation loss {name!r}{did_you_mean(name, list(LOSSES))}")
    return spec
