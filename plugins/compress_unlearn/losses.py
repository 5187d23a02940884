"""The unlearning losses on logits: the forget terms of GA, NPO, SimNPO and DiPO, and the retain terms.

Every function takes causal-LM ``logits`` of shape ``[batch, seq, vocab]`` and ``labels`` of
shape ``[batch, seq]`` (-100 where a token is not scored: padding, and the prompt when only
answers are learned); position ``t`` predicts label ``t + 1``. Arithmetic is float32.
Reference logits are never differentiated.

Definitions follow open-unlearning (locuslab/open-unlearning, ``src/trainer/utils.py`` and
``src/trainer/unlearn/*.py``), which for NPO matches the NPO authors' code
(licong-lin/negative-preference-optimization) and for SimNPO the SimNPO authors' code
(OPTML-Group/Unlearn-Simple) with its margin ``delta`` subtracted inside the β scaling.
DiPO has no public code; :func:`dipo_loss` says what is reconstructed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log-probabilities [B, T-1, V], next-token labels [B, T-1] with -100 made 0, scored mask [B, T-1])``."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return log_probs, targets.masked_fill(~mask, 0), mask


def sequence_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: the summed negative log-likelihood of its scored tokens, and their number
    (open-unlearning's ``compute_batch_nll`` and the token count SimNPO divides by)."""
    log_probs, targets, mask = shifted(logits, labels)
    token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_nll * mask).sum(-1), mask.sum(-1)


def mean_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """The token-mean NLL over the batch's scored tokens (transformers' causal-LM ``loss``)."""
    total, count = sequence_nll(logits, labels)
    return total.sum() / count.sum().clamp_min(1)


def gradient_ascent_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """GA's forget term: minus the token-mean NLL of the forget answers."""
    return -mean_nll(logits, labels)


def npo_loss(logits: Tensor, reference_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """NPO's forget term (Zhang et al. 2024, eq. 3): −(2/β)·mean log σ(β·(ℓ_θ − ℓ_ref)),
    ℓ the summed answer NLL of each sequence under the model and the frozen reference.

    As β → 0 its gradient tends to that of −mean ℓ_θ (gradient ascent on summed NLL); at
    ℓ_θ = ℓ_ref its value is (2/β)·log 2.
    """
    ours, _ = sequence_nll(logits, labels)
    with torch.no_grad():
        theirs, _ = sequence_nll(reference_logits, labels)
    return -(2.0 / beta) * F.logsigmoid(beta * (ours - theirs)).mean()


def simnpo_loss(logits: Tensor, labels: Tensor, beta: float, delta: float) -> Tensor:
    """SimNPO's forget term (Fan et al. 2024): −(2/β)·mean log σ(β·(ℓ_θ/|y| − δ)), reference-free,
    ℓ_θ/|y| the answer NLL per scored token. ``delta`` is the code's margin (the paper's γ is β·δ)."""
    total, count = sequence_nll(logits, labels)
    return -(2.0 / beta) * F.logsigmoid(beta * (total / count.clamp_min(1) - delta)).mean()


def retain_kl(logits: Tensor, reference_logits: Tensor, attention_mask: Tensor) -> Tensor:
    """KL(reference ‖ model) of the next-token distributions, mean over real (unpadded) positions.

    open-unlearning's ``compute_kl_divergence`` averages over every position, padding
    included; padding is left out here (our choice), so the value does not depend on how
    a batch is padded.
    """
    ours = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        theirs = F.log_softmax(reference_logits.float(), dim=-1)
    per_position = (theirs.exp() * (theirs - ours)).sum(-1)
    real = attention_mask.bool()
    return per_position[real].sum() / real.sum().clamp_min(1)


def distribution_pair(reference_logits: Tensor, top_k: int, strength: float) -> tuple[Tensor, Tensor]:
    """DiPO's preference pair at every position: ``(forgetting-promoting, memory-promoting)``
    next-token distributions, each ``[..., vocab]``.

    Both come from the reference's own logits: its ``top_k`` highest logits (its
    high-confidence tokens) are lowered by ``strength`` for the preferred, forgetting
    distribution and raised by ``strength`` for the dispreferred, memorizing one; every
    other logit is kept, so the other tokens keep their relative probabilities.
    """
    logits = reference_logits.float()
    top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
    shift = strength * top.float()
    return F.softmax(logits - shift, dim=-1), F.softmax(logits + shift, dim=-1)


def dipo_loss(
    logits: Tensor, reference_logits: Tensor, labels: Tensor, beta: float, alpha: float, top_k: int, strength: float
) -> Tensor:
    """DiPO's forget term, reconstructed (Qin et al. 2025, arXiv 2510.04773; no public code).

    From the paper's abstract: preferences are between next-token *distributions*, made
    from the model's own logits by suppressing or amplifying its high-confidence ones
    (:func:`distribution_pair`), in a token-level DPO (TDPO, Zeng et al. 2024) Bradley–Terry
    loss with a sequential KL term. Our reconstruction, each detail our choice:

    - the pair is built from the frozen reference (the model as unlearning starts), so
      the targets do not drift while training;
    - a distribution q earns the implicit reward u(q) = Σ_t Σ_v q_t(v)·(log π_θ(v|s_t) −
      log π_ref(v|s_t)) over the scored answer positions t: TDPO's token log-ratio, taken
      in expectation under q instead of at one sampled token;
    - both distributions of a pair share the context s_t, so TDPO's sequential KL
      difference δ = β·(D_SeqKL(lose) − D_SeqKL(win)) is taken in its TDPO2 form,
      α·β·(D − sg(D)) with D = Σ_t KL(π_ref ‖ π_θ)(s_t): zero in value, its gradient a
      KL pull toward the reference weighted by the Bradley–Terry factor;
    - the loss is −mean log σ(β·(u(q⁺) − u(q⁻)) − α·β·(D − sg(D))), without NPO's 2/β scale.

    At θ = ref the value is log 2; lowering it moves probability off the high-confidence
    tokens (where q⁻ > q⁺) onto the rest.
    """
    log_probs, _, mask = shifted(logits, labels)
    with torch.no_grad():
        reference = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
        forgetting, memorizing = distribution_pair(reference_logits[:, :-1], top_k, strength)
    log_ratio = log_probs - reference
    margin = ((forgetting - memorizing) * log_ratio).sum(-1)
    kl = (reference.exp() * (reference - log_probs)).sum(-1)
    weight = mask.float()
    reward = beta * (margin * weight).sum(-1)
    sequential_kl = (kl * weight).sum(-1)
    return -F.logsigmoid(reward - alpha * beta * (sequential_kl - sequential_kl.detach())).mean()
