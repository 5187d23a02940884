"""FIMA-Q's reconstruction losses and rounding regularizer (``utils/block_recon.py``:
``LossFunction``, ``LinearTempDecay``, ``new_fisher_ro``).

With ``Δ = |ẑ - z|`` (quantized minus full-precision block output, flattened per sample),
``G`` the k rows of mean |∂KL/∂z| and ``D`` the k rows of mean |ẑ - z| gathered at the
Fisher refreshes, ``B⁻¹ = (D Dᵀ)⁻¹``:

* ``mse``: ``Σ Δ²`` per sample, averaged, divided by its first-iteration value;
* ``diag``: ``mean(Δ² ⊙ mean_k |G|)``, times 2, divided by its value at the last refresh;
* ``lowrank``: ``mean((Δ Gᵀ) B⁻¹ (Δ Gᵀ)ᵀ)``, times 2, likewise normalized (the code's
  ``fisher_lr`` is this term's rank-1 case: it broadcasts only for k = 1);
* ``dplr``: both terms, each divided by its own value at the last refresh, weights 1 and 1;
* outside the blocks the classifier is fitted with ``KL(softmax(z) || softmax(ẑ))``, as the
  code's ``head`` block.

Rounding: ``λ Σ (1 - |2h - 1|^b)`` with λ = 0.01, zero for the first 20 % of the iterations,
then ``b`` falls linearly from 20 to 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


@dataclass
class FisherFactors:
    """The rows gathered at the refreshes and ``B⁻¹``."""

    gradients: torch.Tensor | None = None
    differences: torch.Tensor | None = None
    inverse: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.gradients is None else self.gradients.shape[0]

    def add(self, gradient_row: torch.Tensor, difference_row: torch.Tensor) -> None:
        """Append one row to ``G`` and ``D`` and recompute ``B⁻¹ = inv(D Dᵀ)`` (no damping, as the code)."""
        gradient_row, difference_row = gradient_row.reshape(1, -1), difference_row.reshape(1, -1)
        if self.gradients is None:
            self.gradients, self.differences = gradient_row, difference_row
        else:
            self.gradients = torch.cat([self.gradients, gradient_row])
            self.differences = torch.cat([self.differences, difference_row])
        gram = self.differences.double() @ self.differences.double().T
        # the code inverts without damping; a singular D Dᵀ (repeated rows) takes the pseudo-inverse
        try:
            self.inverse = torch.linalg.inv(gram).float()
        except torch.linalg.LinAlgError:
            self.inverse = torch.linalg.pinv(gram).float()


@dataclass
class ReconstructionLoss:
    """One of ``mse``, ``diag``, ``lowrank``, ``dplr``, ``kl``, normalized as FIMA-Q's code does."""

    kind: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, output: torch.Tensor, target: torch.Tensor, fisher: FisherFactors | None) -> torch.Tensor:
        if self.kind == "kl":
            return F.kl_div(F.log_softmax(output, dim=-1), F.softmax(target, dim=-1), reduction="batchmean")
        delta = (output - target).abs().reshape(output.shape[0], -1).float()
        if self.kind == "mse":
            return self._normalized("mse", delta.pow(2).sum(1).mean())
        terms = {}
        if self.kind in ("diag", "dplr"):
            terms["diag"] = (delta.pow(2) * fisher.gradients.abs().mean(0)).mean()
        if self.kind in ("lowrank", "dplr"):
            projected = delta @ fisher.gradients.abs().T  # (batch, k)
            terms["lowrank"] = (projected @ fisher.inverse * projected).sum(1).mean()
        scale = 2.0 if len(terms) == 1 else 1.0
        return sum(scale * self._normalized(name, term) for name, term in terms.items())

    def _normalized(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in self.initial:
            self.initial[name] = value.detach().clamp(min=torch.finfo(torch.float32).tiny)
        return value / self.initial[name]

    def reset(self) -> None:
        """Take the next value as the divisor (at every Fisher refresh)."""
        self.initial.clear()


def rounding_penalty(roundings: list[torch.Tensor], weight: float, b: float) -> torch.Tensor:
    """AdaRound's regularizer ``weight Σ (1 - |2h - 1|^b)`` over every layer's rounding variables."""
    return weight * sum((1 - ((h - 0.5).abs() * 2).pow(b)).sum() for h in roundings)


def temperature(step: int, iterations: int, warmup: float, start: float, end: float) -> float | None:
    """``b`` at 1-based ``step``: None during the warm-up (no rounding term), then linear from
    ``start`` to ``end`` (``LinearTempDecay`` with ``rel_start_decay = warmup``)."""
    begin = warmup * iterations
    if step < begin:
        return None
    progress = (step - begin) / max(iterations - begin, 1)
    return end + (start - end) * max(0.0, 1 - progress)
