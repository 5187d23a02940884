"""The KL criteria kl_ptq ranks its candidate grids with: KL(original ‖ quantized) between weights.

``pointwise`` (the default) is the estimator the method selects with; the three marginal
estimators (``gaussian``, ``laplace``, ``histogram``) compare only the two *distributions of
values* and are kept for comparison (scripts/klptq_criterion.py measures how each ranks grids
against the layers' output error on real activations: docs/benchmarks.md).

Why pointwise. A layer computes ``W x``: which weight moved matters, not only how the set of
values is spread. A marginal KL is blind to that (any permutation of the quantized weights has
the same marginal) and between a density and a discrete grid it has no finite value without
smoothing, whose width then decides the ranking (a fine binning scores rounding by the spikes
of the grid, a coarse one hides clipping). The pointwise estimator smooths every weight with
one Gaussian kernel of width σ and takes the KL between the smoothed *joint* distributions of
(position, value): P = (1/n) Σᵢ δ(i) N(wᵢ, σ²), Q = (1/n) Σᵢ δ(i) N(ŵᵢ, σ²). Then
KL(P ‖ Q) = (1/n) Σᵢ (wᵢ − ŵᵢ)² / (2σ²), finite for any grid, and by the chain rule an upper
bound on the KL between the smoothed marginals of the values (the information the positions
add can only increase it). Rounding and clipping are both penalised by what they move each
weight. With σ² the variance of the layer's original weights the value is dimensionless and
equals half the squared relative weight error: kl_ptq's choice among grids is therefore the
grid of least weight MSE, which is also the choice of least expected output error
``E‖(W − Ŵ) x‖²`` for isotropic inputs (E xxᵀ = I; see the KLPTQ docstring on pseudo-activations).
"""

from __future__ import annotations

import torch

from compress.api import did_you_mean

ESTIMATORS = ("pointwise", "gaussian", "laplace", "histogram")
DITHER_POINTS = 8
"""Points per weight with which the histogram estimator spreads a level over its cell."""


def check_estimator(name: str) -> str:
    """``name`` if it is an estimator, else ValueError with the closest name."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {name!r}{did_you_mean(name, list(ESTIMATORS))}")
    return name


def weight_kl(
    original: torch.Tensor, quantized: torch.Tensor, step: torch.Tensor | None, estimator: str, bins: int = 1024
) -> float:
    """KL(original ‖ quantized) between two weight tensors of one shape, in nats (per weight for
    ``pointwise``). ``step`` is each quantized weight's grid step (its cell width), which only the
    histogram estimator reads (it turns the discrete quantized distribution into a density)."""
    p = original.detach().float().flatten()
    q = quantized.detach().float().flatten()
    if estimator == "pointwise":
        return ((p - q).pow(2).mean() / (2 * p.var(correction=0).clamp_min(1e-30))).item()
    if estimator == "gaussian":
        (v1, mu1), (v2, mu2) = (tuple(t.double() for t in torch.var_mean(x)) for x in (p, q))
        s1, s2 = v1.sqrt().clamp_min(1e-30), v2.sqrt().clamp_min(1e-30)
        return (torch.log(s2 / s1) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2) - 0.5).item()
    if estimator == "laplace":
        mu1, mu2 = p.double().median(), q.double().median()
        b1 = (p.double() - mu1).abs().mean().clamp_min(1e-30)
        b2 = (q.double() - mu2).abs().mean().clamp_min(1e-30)
        d = (mu1 - mu2).abs()
        return (torch.log(b2 / b1) + d / b2 + (b1 / b2) * torch.exp(-d / b1) - 1).item()
    check_estimator(estimator)
    return histogram_kl(p, q, step.detach().float().flatten().expand_as(q) / 2, bins)


def histogram_kl(p: torch.Tensor, q: torch.Tensor, half: torch.Tensor, bins: int) -> float:
    """KL between the histogram of ``p`` and that of ``q`` with each value spread uniformly over
    ``± half`` (its grid cell), on one common binning of both ranges."""
    lo = torch.minimum(p.min(), (q - half).min()).item()
    hi = torch.maximum(p.max(), (q + half).max()).item()
    if hi <= lo:
        return 0.0
    hist_p = torch.histc(p, bins, lo, hi).double() / p.numel()
    offsets = (torch.arange(DITHER_POINTS, device=q.device, dtype=torch.float32) + 0.5) / DITHER_POINTS - 0.5
    hist_q = torch.zeros(bins, dtype=torch.float64, device=q.device)
    for offset in offsets:  # one pass per offset keeps memory at one copy of the weights
        hist_q += torch.histc(q + 2 * half * offset, bins, lo, hi).double()
    hist_q /= q.numel() * DITHER_POINTS
    eps = 1e-12
    hist_q = (hist_q + eps) / (1 + bins * eps)
    nonzero = hist_p > 0
    return (hist_p[nonzero] * torch.log(hist_p[nonzero] / hist_q[nonzero])).sum().item()
