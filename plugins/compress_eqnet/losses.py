"""EQ-Net's losses: Weight Distribution Regularization and the soft KL of Group Progressive Guidance.

From ``runner/criterion.py``: the kurtosis and skewness of each quantized layer's
full-precision weight (``torch.std``, i.e. the unbiased estimate), each term the squared
distance to its target (kurtosis 1.8, the uniform distribution's; skewness 0), averaged
over the layers except the first; ``KLLossSoft``: ``alpha · KL(teacher ‖ student) +
(1 - alpha) · CE`` at temperature 1, batch-mean KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardized_moment(weight: torch.Tensor, order: int) -> torch.Tensor:
    """``mean(((w - mean) / std) ** order)`` over every element of ``weight``."""
    w = weight.float()
    return (((w - w.mean()) / w.std()) ** order).mean()


def wdr_terms(weights: list[torch.Tensor], kurtosis_target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean kurtosis and skewness penalties over ``weights`` (the first layer's already left out)."""
    kurtosis = torch.stack([(standardized_moment(w, 4) - kurtosis_target) ** 2 for w in weights]).mean()
    skewness = torch.stack([standardized_moment(w, 3) ** 2 for w in weights]).mean()
    return kurtosis, skewness


def soft_kl(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``alpha · KL(softmax(teacher) ‖ softmax(logits)) + (1 - alpha) · CE(logits, labels)``."""
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.softmax(teacher.float(), -1), reduction="batchmean")
    return alpha * kl + (1 - alpha) * F.cross_entropy(logits.float(), labels)
