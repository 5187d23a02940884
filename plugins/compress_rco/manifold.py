"""The budget manifold of RCO (arXiv 2605.00649, section 2; IST-DASLab/RCO ``src/manifold.py``).

Each layer i holds logits ``α_i`` over its candidates, ``p_i = softmax(α_i)``. The expected
cost per targeted weight is

    C(α) = Σ_i w_i Σ_k p_ik d_ik

with ``w_i`` the layer's share of the targeted weights and ``d_ik`` candidate k's cost per
weight of layer i (its bits per weight when the unit is bits). The budget manifold is the
level set ``C(α) = B``. The official code has one cost vector for every layer (the bit
widths, ``d_ik = c_k``); here each layer has its own row, so candidates of different
providers, with scales, outliers or sparsity, price themselves; with equal rows the
formulas below are the official ones term for term.

Layers may have fewer candidates than others: ``valid`` masks the padding, whose
probability is exactly 0 (its logit is replaced by −∞ before the softmax).
"""

from __future__ import annotations

import numpy as np
import torch


def probabilities(alpha: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``softmax(α_i)`` of every layer over its valid candidates (0 on padding)."""
    return torch.softmax(alpha.masked_fill(~valid, float("-inf")), dim=-1)


def expected_cost(alpha: torch.Tensor, density: torch.Tensor, share: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``C(α) = Σ_i w_i Σ_k p_ik d_ik`` (differentiable)."""
    return ((probabilities(alpha, valid) * density).sum(-1) * share).sum()


def budget_normal(alpha: torch.Tensor, density: torch.Tensor, share: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The normal of the level set of C at α, in closed form: ``∂C/∂α_ik = w_i p_ik (d_ik − E_{p_i}[d_i])``."""
    p = probabilities(alpha, valid)
    mean = (p * density).sum(-1, keepdim=True)
    return p * (density - mean) * share[:, None]


def project(vector: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """``vector`` without its component along ``normal`` (onto the tangent plane)."""
    return vector - (vector * normal).sum() / ((normal * normal).sum() + 1e-30) * normal


def retract(
    alpha: torch.Tensor,
    density: torch.Tensor,
    share: torch.Tensor,
    valid: torch.Tensor,
    target: float,
    tol: float = 1e-4,
    doublings: int = 40,
    bisections: int = 60,
) -> float:
    """Move ``α`` (in place) back onto ``C = target`` along the cost: ``α ← α + t·d`` with the
    scalar t found by bisection; return C at the result.

    As the official ``retraction``: C(α + t·d) grows with t (its derivative is
    ``Σ_i w_i Var_{p_i}(d_i) ≥ 0``), the bracket starts at [−1, 1] and is doubled on the side
    that has not crossed the target (at most ``doublings`` times), then bisected (at most
    ``bisections`` times) until ``|C − target| < tol`` (the code's 1e-4 bits).
    """
    with torch.no_grad():
        # C on the host in numpy: a bisection evaluates it up to ~100 times on a small matrix,
        # where torch's per-call overhead would dominate each step of a search
        logits, costs = alpha.detach().double().cpu().numpy(), density.double().cpu().numpy()
        weights, mask = share.double().cpu().numpy(), valid.cpu().numpy()

        def cost(shift: float) -> float:
            shifted = np.where(mask, logits + shift * costs, -np.inf)
            p = np.exp(shifted - shifted.max(1, keepdims=True))
            return float((p * costs).sum(1) / p.sum(1) @ weights)

        if abs(cost(0.0) - target) < tol:
            return cost(0.0)
        low, high = -1.0, 1.0
        for _ in range(doublings):
            below, above = cost(low) > target, cost(high) < target
            if not below and not above:
                break
            low, high = (2 * low if below else low), (2 * high if above else high)
        for _ in range(bisections):
            middle = (low + high) / 2
            value = cost(middle)
            if abs(value - target) < tol:
                low = high = middle
                break
            if value > target:
                high = middle
            else:
                low = middle
        shift = (low + high) / 2
        reached = cost(shift)  # before the update: ``logits`` may share α's memory
        alpha.add_(shift * density.to(alpha.dtype))
        return reached


def transport(optimizer: torch.optim.Adam, alpha: torch.Tensor, normal: torch.Tensor) -> None:
    """Vector transport by projection: Adam's first moment of ``α`` onto the tangent plane at the
    new point (``normal`` is its normal there); the second moment, a per-coordinate scale with no
    direction, is left as it is (paper Appendix A.5, the official ``vector_transport``)."""
    state = optimizer.state.get(alpha)
    if state and "exp_avg" in state:
        with torch.no_grad():
            state["exp_avg"].copy_(project(state["exp_avg"], normal.to(state["exp_avg"].dtype)))
