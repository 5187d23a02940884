from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.api import (
    Candidate,
    CandidateRequest,
    Context,
    LayerMethod,
    LayerState,
    OutlierSplit,
    Produces,
    QuantGrid,
    QuantParams,
    QuantScheme,
    UserError,
    check_group_width,
    compute_grid,
    quantizer_settings,
)

SCALE_BITS = 16
"""Bits of one stored scale (fp16/bf16), as ``compress_rtn.method.storage_bits`` counts it."""
ZERO_POINT_BITS = 8
"""Bits of one stored zero point (int8), asymmetric grids only."""
DITHER_POINTS = 8
"""Points per weight with which the histogram estimator spreads a level over its cell."""


class KLPTQParams(QuantParams):
    """Parameters of ``kl_ptq``: the inlier grid (per group, or per output channel with
    ``group_size: null``; the outlier grid has the same granularity) and the outlier split."""

    granularities = ("channel", "group")

    outlier_fraction: float | None = Field(
        0.01,
        ge=0.0,
        lt=0.5,
        description="Target fraction of weights held apart as outliers. The adaptive-LASSO "
        "penalty lambda is set so that exactly round(fraction x weights) weights of the layer "
        "(or of each group, see lambda_scope) pass the soft threshold |w| - lambda/|w| > 0. "
        "Leave unset (null) when outlier_lambda is given.",
    )
    outlier_lambda: float | None = Field(
        None,
        ge=0.0,
        description="A fixed adaptive-LASSO penalty lambda instead of a target fraction: "
        "weights with |w| > sqrt(lambda) are outliers. The same value is used for every "
        "layer, so it only makes sense for layers with similar weight scales.",
    )
    lambda_scope: Literal["layer", "group"] = Field(
        "layer",
        description="'layer': one lambda per layer (the adaptive-LASSO problem of the paper has "
        "one penalty per weight matrix; outliers concentrate where the large weights are). "
        "'group': one lambda per group of group_size weights, each group holding "
        "round(fraction x group_size) outliers.",
    )
    outlier_bits: int = Field(
        8,
        ge=2,
        le=8,
        description="Bits per outlier weight. Outliers get a grid of their own per group "
        "(scale from the group's outliers only); the default 8 is the mixed precision of AdpQ "
        "(salient weights kept at higher precision).",
    )
    outlier_index: Literal["csr", "bitmap"] = Field(
        "csr",
        description="How the outlier positions are stored, for the effective-bits accounting: "
        "'csr' = a ceil(log2(in_features))-bit column index per outlier plus a "
        "ceil(log2(in_features+1))-bit outlier count per row; 'bitmap' = one mask bit per weight.",
    )
    kl_estimator: Literal["gaussian", "laplace", "histogram"] = Field(
        "gaussian",
        description="How KL(original || quantized) between the layer's weight distributions is "
        "measured. 'gaussian' / 'laplace': closed-form KL between fits of the two samples "
        "(mean/std, or median/mean absolute deviation). 'histogram': nonparametric, on one common "
        "binning of the layer's range, with each quantization level's mass spread uniformly over "
        "its cell (the quantized distribution as a density); unreliable when the original weights "
        "are themselves discrete (e.g. dequantized from a GGUF file).",
    )
    kl_bins: int = Field(
        1024,
        ge=16,
        le=65536,
        description="Bins of the common binning used by the histogram estimator.",
    )
    scale_candidates: int = Field(
        5,
        ge=1,
        le=64,
        description="Inlier scales tried per layer (symmetric grids): evenly spaced between the "
        "tightest scale that still keeps every inlier within half a step (it uses both ends of "
        "the signed code range) and the plain round-to-nearest scale max|w|/(qmax+1/2). The "
        "one with the smallest KL is kept. 1 = the tightest scale only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _lambda_replaces_fraction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("outlier_lambda") is not None and "outlier_fraction" not in data:
            return {**data, "outlier_fraction": None}
        return data

    @model_validator(mode="after")
    def _one_of_fraction_or_lambda(self) -> Self:
        if (self.outlier_fraction is None) == (self.outlier_lambda is None):
            raise ValueError("give exactly one of outlier_fraction and outlier_lambda")
        return self

    def outlier_scheme(self) -> QuantScheme:
        """The outliers' grid: ``outlier_bits`` wide, the inlier grid's granularity."""
        return self.scheme().model_copy(update={"bits": self.outlier_bits})

    def group_width(self, columns: int) -> int:
        """Input columns that share a scale in a layer ``columns`` wide (all of them per channel)."""
        return columns if self.group_size is None else self.group_size


class KLPTQ(LayerMethod):
    """KL-guided statistical pre-calibration (Ghaffari et al., arXiv 2501.09107; AdpQ, arXiv 2405.13358).

    Data-free and weight-adaptive: no calibration data is read. Each layer goes through
    three steps.

    Outliers by adaptive-LASSO soft thresholding. With the adaptive penalty lambda/|w| per
    weight, the soft-thresholded weight sign(w)·max(|w| − lambda/|w|, 0) is non-zero exactly
    when |w| > sqrt(lambda); those weights are the outliers (salient weights), the rest the
    inliers. The threshold only selects: the original values are quantized, not the shrunk
    ones. lambda comes from a target outlier fraction (outlier_fraction; one lambda per layer
    by default, since the LASSO problem of the papers has one penalty per weight matrix, or
    one per group with lambda_scope: group) or is given (outlier_lambda). The count is met
    exactly: a tie of equal magnitudes at the threshold, which no lambda can split, is split
    deterministically (by position within a group; in torch.topk's order per layer).

    Two grids. Inliers are quantized per group of group_size input columns (per output channel
    with group_size: null) on a bits-bit grid whose scale comes from the group's inliers only;
    outliers on a grid of their own (outlier_bits, default 8: AdpQ's mixed precision), its
    scale from the group's outliers only. Both follow compressed-tensors conventions (signed codes, round half to even). No
    inlier is clipped: every inlier lies within half a step of its group's scale.

    KL-guided grid choice. The papers' claim is that separating the outliers keeps the
    quantized weights' distribution close in KL divergence to the original's. The method
    measures that KL per layer and minimises it over the inlier scales that keep every inlier
    within half a step (scale_candidates scales from the tightest one, which also uses the
    extra negative code, up to plain round-to-nearest's). Clipping is not searched: a weight
    that would be clipped is by construction an outlier. The KL of a continuous and a discrete
    distribution is taken by default between Gaussian fits (closed form): the papers reason
    about the weights as a sample of a density, and a nonparametric histogram estimate
    (offered, with Laplace fits) proved unstable on real checkpoints whose weights are
    themselves discrete.

    The weights are replaced by their dequantized values. context.layers[name] gets
    LayerState("kl_ptq", quant=<inlier grid>, outliers=OutlierSplit(mask, <outlier grid>)); the
    outlier grid is a QuantGrid over the full weight shape (one scale per group, 1 in groups
    without outliers) of which only the masked entries matter.

    Report per layer: kl (the minimised KL), kl_rtn (the same estimator on plain
    round-to-nearest at the same bits and group size), outlier_fraction, outliers, lambda (the
    median over groups with lambda_scope: group), scale_choice (0 = tightest scale,
    1 = round-to-nearest's), relative_error and relative_error_rtn (‖W − Ŵ‖/‖W‖) and
    effective_bits, the exact storage per weight: bits per weight for the dense inlier code
    matrix (outlier positions hold a placeholder code), a 16-bit scale (and an 8-bit zero point
    when asymmetric) per group, outlier_bits per outlier, a 16-bit scale (and zero point) per
    group holding at least one outlier, and the outlier positions (outlier_index: CSR column
    indices plus per-row counts, or a 1-bit mask per weight); a layer without outliers pays
    for no outlier structure. The parts are under storage_bits.

    Writers that store only LayerState.quant cannot hold the outliers: use the dense writer
    (the weights already hold the dequantized values).
    """

    name = "kl_ptq"
    Params = KLPTQParams

    def produces(self) -> Produces:
        return Produces(quant=self.params.scheme(), outliers=True)

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        result = quantize_layer(name, module.weight.data, self.params)
        module.weight.data = result.weight
        state = result.state()
        context.update_layer(name, method=state.method, quant=state.quant, outliers=state.outliers)
        return result.report()


# ---------------------------------------------------------------------------------------
# soft threshold and lambda


def soft_threshold(weight: torch.Tensor, lam: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-LASSO soft threshold: ``sign(w)·(|w| − lam/|w|)₊`` and the mask where it is non-zero.

    Computed in float64 as ``(w² − lam)/|w|`` (a float32 weight squares exactly in float64), so the
    mask is exactly ``w² > lam``, i.e. ``|w| > sqrt(lam)``; ``w = 0`` is never an outlier.
    ``lam`` broadcasts against ``weight``.
    """
    w = weight.double()
    lam = torch.as_tensor(lam, dtype=torch.float64, device=w.device)
    excess = w * w - lam
    mask = excess > 0
    shrunk = torch.where(mask, torch.sign(w) * excess / w.abs().clamp_min(1e-300), torch.zeros_like(w))
    return shrunk.to(weight.dtype), mask


def lambda_for_count(magnitudes: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """lambda per row of ``magnitudes`` (…, n) so that ``count`` of them pass the soft threshold.

    lambda = m_k·m_(k+1) (float64, exact for float32 magnitudes), so m_(k+1) < sqrt(lambda) < m_k
    when the k-th and (k+1)-th largest magnitudes differ. When they tie, lambda = m_k², which the
    tied weights do not pass; the mask then adds as many of them as the count needs.
    """
    m = magnitudes.double()
    n = m.shape[-1]
    ordered = torch.sort(m, dim=-1, descending=True).values
    padded = torch.cat([torch.full_like(ordered[..., :1], math.inf), ordered, torch.zeros_like(ordered[..., :1])], -1)
    k = torch.as_tensor(count, device=m.device).long().clamp(0, n).expand(m.shape[:-1]).unsqueeze(-1)
    above, below = padded.gather(-1, k), padded.gather(-1, k + 1)  # m_k (inf for k=0) and m_(k+1) (0 for k=n)
    lam = torch.where(torch.isinf(above), below * below * 2 + 1e-300, above * below)
    return lam.squeeze(-1)


# ---------------------------------------------------------------------------------------
# KL estimators


def weight_kl(
    original: torch.Tensor, quantized: torch.Tensor, step: torch.Tensor, estimator: str, bins: int = 1024
) -> float:
    """KL(original ‖ quantized) between the distributions of two weight samples, in nats.

    ``step`` is each quantized weight's grid step (its cell width), used by the histogram
    estimator to turn the discrete quantized distribution into a density.
    """
    p = original.detach().float().flatten()
    q = quantized.detach().float().flatten()
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
    half = step.detach().float().flatten().expand_as(q) / 2
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


# ---------------------------------------------------------------------------------------
# the layer


@dataclass
class LayerResult:
    weight: torch.Tensor
    grid: QuantGrid
    mask: torch.Tensor
    outlier_grid: QuantGrid
    report_entries: dict[str, Any]

    def state(self) -> LayerState:
        return LayerState(
            method=KLPTQ.name,
            quant=self.grid.to("cpu"),
            outliers=OutlierSplit(self.mask.cpu(), self.outlier_grid.to("cpu")),
        )

    def report(self) -> dict[str, Any]:
        return self.report_entries


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def split_outliers(weight: torch.Tensor, params: KLPTQParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The outlier mask and lambda (a 0-d tensor, or one per group for ``lambda_scope: group``)."""
    w = weight.detach().float()
    if params.outlier_lambda is not None:
        lam = torch.tensor(params.outlier_lambda, dtype=torch.float64, device=w.device)
        return soft_threshold(w, lam)[1], lam
    if params.lambda_scope == "layer":
        count = round(params.outlier_fraction * w.numel())
        magnitudes = w.abs().flatten()
        # only the count + 1 largest magnitudes matter (a full sort of the layer is slow)
        top = torch.topk(magnitudes, min(count + 1, magnitudes.numel()), sorted=True)
        lam = lambda_for_count(top.values, count)
        if count == magnitudes.numel():
            lam = torch.zeros((), dtype=torch.float64, device=w.device)
        mask = torch.zeros_like(magnitudes, dtype=torch.bool)
        mask[top.indices[:count]] = True
        return mask.view_as(w), lam
    width = params.group_width(w.shape[1])
    groups = group_view(w, width)
    count = round(params.outlier_fraction * width)
    lam = lambda_for_count(groups.abs(), count)  # (rows, n_groups)
    return top_count_mask(groups.abs(), count).flatten(-2), lam


def top_count_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest magnitudes along the last dimension: exactly the weights that pass the
    soft threshold of ``lambda_for_count``, except that a tie at the threshold (which no lambda
    can split) is split by position, the earlier weights first, so the count is met exactly."""
    order = torch.sort(magnitudes, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(magnitudes, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :count], True)


def tight_symmetric_scale(values: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Smallest scale per group that keeps every value within half a step: the positive side may
    reach (qmax + 1/2)·scale and the negative side (qmin − 1/2)·scale."""
    width = scheme.group_size if scheme.granularity == "group" else values.shape[-1]
    groups = group_view(values.float(), width)
    positive = groups.amax(-1).clamp_min(0) / (scheme.qmax + 0.5)
    negative = (-groups.amin(-1)).clamp_min(0) / (0.5 - scheme.qmin)
    return torch.maximum(positive, negative)


def grid_for(values: torch.Tensor, scheme: QuantScheme, choice: float) -> QuantGrid:
    """The grid of ``values`` (zeros where a weight belongs to the other grid). Asymmetric grids
    are round-to-nearest's (already within half a step); symmetric ones interpolate between
    the tight scale (``choice`` 0) and round-to-nearest's (``choice`` 1)."""
    rtn = compute_grid(values, scheme)
    if not scheme.symmetric or choice == 1.0:
        return rtn
    tight = tight_symmetric_scale(values, scheme)
    scale = tight + choice * (rtn.scale - tight)
    return QuantGrid(scheme, scale.masked_fill(tight == 0, 1.0), None)  # empty groups: scale 1, as compute_grid


def per_weight_step(grid: QuantGrid, shape: torch.Size) -> torch.Tensor:
    return grid.scale.unsqueeze(-1).expand(shape[0], grid.scale.shape[1], shape[1] // grid.scale.shape[1]).flatten(-2)


def effective_bits(shape: tuple[int, int], mask: torch.Tensor, params: KLPTQParams) -> tuple[float, dict[str, int]]:
    """Exact storage of a layer in bits per weight, and the parts it adds up from."""
    rows, columns = shape
    weights = rows * columns
    per_group = SCALE_BITS + (0 if params.symmetric else ZERO_POINT_BITS)
    width = params.group_width(columns)
    groups = weights // width
    outliers = int(mask.sum())
    groups_with_outliers = int(group_view(mask, width).any(-1).sum())
    if outliers == 0:
        index = 0
    elif params.outlier_index == "csr":
        index = outliers * math.ceil(math.log2(columns)) + rows * math.ceil(math.log2(columns + 1))
    else:
        index = weights
    parts = {
        "inlier_codes": weights * params.bits,
        "inlier_scales": groups * per_group,
        "outlier_codes": outliers * params.outlier_bits,
        "outlier_scales": groups_with_outliers * per_group,
        "outlier_index": index,
    }
    return sum(parts.values()) / weights, parts


def quantize_layer(name: str, weight: torch.Tensor, params: KLPTQParams) -> LayerResult:
    """Quantize a 2-D weight (not in place); the dequantized weight, both grids, mask and report."""
    if weight.ndim != 2:
        raise UserError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}", name)
    if not torch.isfinite(weight).all():
        raise UserError("weights contain NaN or inf", name)
    check_group_width(params.scheme(), weight.shape[1], name)
    w = weight.detach().float()
    scheme, outlier_scheme = params.scheme(), params.outlier_scheme()
    mask, lam = split_outliers(w, params)
    inliers, outliers = w.masked_fill(mask, 0.0), w.masked_fill(~mask, 0.0)

    outlier_grid = grid_for(outliers, outlier_scheme, 0.0)
    outlier_values = outlier_grid.fake_quantize(w)
    outlier_step = per_weight_step(outlier_grid, w.shape)

    choices = [0.0] if params.scale_candidates == 1 else torch.linspace(0, 1, params.scale_candidates).tolist()
    best = None
    for choice in choices:
        grid = grid_for(inliers, scheme, choice)
        quantized = torch.where(mask, outlier_values, grid.fake_quantize(w))
        step = torch.where(mask, outlier_step, per_weight_step(grid, w.shape))
        kl = weight_kl(w, quantized, step, params.kl_estimator, params.kl_bins)
        if best is None or kl < best[0]:
            best = (kl, choice, grid, quantized)
    kl, choice, grid, quantized = best

    rtn_grid = compute_grid(w, scheme, name)
    rtn = rtn_grid.fake_quantize(w)
    kl_rtn = weight_kl(w, rtn, per_weight_step(rtn_grid, w.shape), params.kl_estimator, params.kl_bins)

    norm = w.pow(2).sum().clamp_min(1e-24)
    bits, parts = effective_bits(tuple(w.shape), mask, params)
    outlier_count = int(mask.sum())
    report = {
        "bits": params.bits,
        "outlier_bits": params.outlier_bits,
        "kl": kl,
        "kl_rtn": kl_rtn,
        "kl_estimator": params.kl_estimator,
        "outlier_fraction": outlier_count / w.numel(),
        "outliers": outlier_count,
        "lambda": (lam.median() if lam.ndim else lam).item(),
        "scale_choice": choice,
        "relative_error": ((quantized - w).pow(2).sum() / norm).sqrt().item(),
        "relative_error_rtn": ((rtn - w).pow(2).sum() / norm).sqrt().item(),
        "effective_bits": bits,
        "storage_bits": parts,
    }
    return LayerResult(quantized.to(weight.dtype), grid, mask, outlier_grid, report)


# ---------------------------------------------------------------------------------------
# candidates for search methods


def kl_ptq_candidates(name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """kl_ptq variants of a Linear layer for each requested ``bits`` (and ``group_size``), with the
    default outlier settings (or ``outlier_fraction`` values when the request lists them)."""
    candidates = []
    for setting in quantizer_settings(module, request, {"group_size": [128], "outlier_fraction": [0.01]}):
        params = KLPTQParams(**setting)
        result = quantize_layer(name, module.weight.data, params)
        cost = sum(result.report_entries["storage_bits"].values())
        error = result.report_entries["relative_error"] ** 2

        def apply(target: nn.Module, params: KLPTQParams = params) -> LayerState:
            applied = quantize_layer(name, target.weight.data, params)
            target.weight.data = applied.weight
            return applied.state()

        candidates.append(Candidate(KLPTQ.name, setting, cost, error, apply))
    return candidates
