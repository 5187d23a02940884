"""kl_ptq: data-free PTQ with adaptive-LASSO outliers and a KL-chosen grid (the method and its layer)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.api import (
    Candidate,
    CandidateOffer,
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
    weight_cost,
)
from compress_kl_ptq.criterion import check_estimator, weight_kl
from compress_kl_ptq.storage import SCALE_BITS, ZERO_POINT_BITS, storage_parts, storage_range

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
"""Default shrink factors of the inlier grid's range (1 = round-to-nearest's max-abs range)."""
BUDGET_FRACTIONS = (0.0, 0.0025, 0.005, 0.01, 0.02)
"""Outlier fractions searched by default when a ``bits_per_weight`` budget is given."""


class KLPTQParams(QuantParams):
    """Parameters of ``kl_ptq``: the inlier grid (per group, or per output channel with
    ``group_size: null``; the outlier grid has the same granularity), the outlier split, the
    candidate grids and the storage budget."""

    granularities = ("channel", "group")

    outlier_fraction: float | list[float] | None = Field(
        0.01,
        description="Fraction of weights held apart as outliers: one value, or a list of candidate "
        "fractions of which the criterion picks one per layer (among those within bits_per_weight). "
        "The adaptive-LASSO penalty lambda is set so that exactly round(fraction x weights) weights "
        "of the layer (or of each group, see lambda_scope) pass the soft threshold "
        "|w| - lambda/|w| > 0. Default 0.01, or [0, 0.0025, 0.005, 0.01, 0.02] when bits_per_weight "
        "is given. Leave unset (null) when outlier_lambda is given.",
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
        description="Bits per outlier weight. Outliers get a round-to-nearest grid of their own per "
        "group (scale from the group's outliers only); the default 8 is the mixed precision of AdpQ "
        "(salient weights kept at higher precision).",
    )
    outlier_index: Literal["csr", "bitmap"] = Field(
        "csr",
        description="How the outlier positions are stored, for the storage accounting: "
        "'csr' = a ceil(log2(in_features))-bit column index per outlier plus a "
        "ceil(log2(in_features+1))-bit outlier count per row; 'bitmap' = one mask bit per weight.",
    )
    clip_ratios: list[float] = Field(
        list(CLIP_RATIOS),
        min_length=1,
        description="Candidate shrink factors of each inlier group's range: the inlier grid is "
        "round-to-nearest's on the group's inliers with its range (max-abs, or min and max when "
        "asymmetric) multiplied by the factor, so factors below 1 clip the largest inliers. Every "
        "factor is tried with every outlier fraction; the criterion picks the pair.",
    )
    clip_scope: Literal["layer", "group"] = Field(
        "layer",
        description="'layer': one clip ratio for the whole layer, chosen by the criterion. 'group': every "
        "group (every output channel with group_size: null) takes the ratio of least squared error "
        "over its inliers; since the pointwise KL is a sum over groups, that is the criterion's choice "
        "among all combinations of per-group ratios, at no storage cost (each group stores its own "
        "scale anyway). Needs kl_estimator: pointwise. Lower weight error is not always lower model "
        "error: on SmolLM2 at W3 it helped out of domain and hurt in-domain (docs/benchmarks.md).",
    )
    bits_per_weight: float | None = Field(
        None,
        gt=0,
        description="Storage budget per layer, in bits per weight, counting everything stored: codes, "
        "scales, zero points, outlier codes, outlier scales and outlier positions. Candidates above it "
        "are not considered; a layer no candidate fits is refused with the nearest achievable figure "
        "(at recipe check where the shapes decide it).",
    )
    kl_estimator: str = Field(
        "pointwise",
        description="How KL(original || quantized) is measured (compress_kl_ptq.criterion). "
        "'pointwise' (default): every weight smoothed by one Gaussian of the layer's weight variance, "
        "KL between the smoothed joint distributions of (position, value), = mean squared error / "
        "(2 variance); it penalises rounding and clipping alike. 'gaussian' / 'laplace': closed-form "
        "KL between fits of the two value distributions; 'histogram': nonparametric KL of the value "
        "distributions on one common binning (each level spread over its cell). The three marginal "
        "ones ignore which weight moved and rank grids poorly against output error (docs/benchmarks.md).",
    )
    kl_bins: int = Field(
        1024,
        ge=16,
        le=65536,
        description="Bins of the common binning used by the histogram estimator.",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_fraction(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "outlier_fraction" in data:
            return data
        if data.get("outlier_lambda") is not None:
            return {**data, "outlier_fraction": None}
        if data.get("bits_per_weight") is not None:
            return {**data, "outlier_fraction": list(BUDGET_FRACTIONS)}
        return data

    @model_validator(mode="after")
    def _one_of_fraction_or_lambda(self) -> Self:
        if (self.outlier_fraction is None) == (self.outlier_lambda is None):
            raise ValueError("give exactly one of outlier_fraction and outlier_lambda")
        if self.outlier_fraction is not None:
            if not self.fractions():
                raise ValueError("outlier_fraction: give at least one fraction")
            if any(not 0 <= f < 0.5 for f in self.fractions()):
                raise ValueError(f"outlier_fraction: every fraction must be in [0, 0.5), got {self.outlier_fraction}")
        if any(not 0 < r <= 1 for r in self.clip_ratios):
            raise ValueError(f"clip_ratios: every ratio must be in (0, 1], got {self.clip_ratios}")
        if self.clip_scope == "group" and self.kl_estimator != "pointwise":
            raise ValueError(
                f"clip_scope: group needs kl_estimator: pointwise (the only criterion that is a sum over "
                f"groups), got {self.kl_estimator!r}"
            )
        return self

    @field_validator("kl_estimator")
    @classmethod
    def _known_estimator(cls, value: str) -> str:
        return check_estimator(value)

    def fractions(self) -> list[float]:
        """The candidate outlier fractions, ascending ([] with a fixed outlier_lambda)."""
        if self.outlier_fraction is None:
            return []
        fractions = self.outlier_fraction if isinstance(self.outlier_fraction, list) else [self.outlier_fraction]
        return sorted(set(fractions))

    def outlier_scheme(self) -> QuantScheme:
        """The outliers' grid: ``outlier_bits`` wide, the inlier grid's granularity."""
        return self.scheme().model_copy(update={"bits": self.outlier_bits})

    def group_width(self, columns: int) -> int:
        """Input columns that share a scale in a layer ``columns`` wide (all of them per channel)."""
        return columns if self.group_size is None else self.group_size

    def fraction_can_fit(self, fraction: float) -> bool:
        """Whether ``fraction`` can meet ``bits_per_weight`` in a layer of some shape: outliers cost
        at least their ``outlier_bits`` codes on top of the inlier codes and scales (their own scales
        and positions only add to that), so a fraction above what the budget leaves fits no layer."""
        if self.bits_per_weight is None or fraction == 0:
            return True
        per_group = SCALE_BITS + (0 if self.symmetric else ZERO_POINT_BITS)
        scales = 0.0 if self.group_size is None else per_group / self.group_size
        return self.bits + scales + fraction * self.outlier_bits <= self.bits_per_weight

    def storage_range(self, shape: tuple[int, int], fraction: float) -> tuple[int, int]:
        """The fewest and the most bits a layer of ``shape`` can take with ``fraction`` of its weights
        as outliers (:func:`compress_kl_ptq.storage.storage_range`)."""
        width = self.group_width(shape[1])
        return storage_range(shape, width, self.bits, self.symmetric, fraction, self.outlier_bits, self.outlier_index)

    def least_bits(self, shape: tuple[int, int]) -> tuple[float, float]:
        """The fewest bits per weight any candidate fraction can take in a layer of ``shape``: exact
        for no outliers, otherwise with the outliers packed into as few groups as they fill (the
        weights decide how many they actually touch); and that fraction."""
        return min((self.storage_range(shape, f)[0] / (shape[0] * shape[1]), f) for f in self.fractions())


def candidate_cost_range(module: nn.Module, setting: dict[str, Any], unit: str) -> tuple[float, float]:
    """Bounds on the cost of a kl_ptq candidate of a Linear ``module`` from its shape alone.

    In weights kept it is exact (every weight is kept). In storage bits only bounds are possible:
    the outliers' count is exact (a fraction gives ``round(fraction × weights)`` of them) and so
    are the codes, scales and CSR positions, but the groups they touch, each storing a scale of the
    outlier grid, depend on where the large weights are: from as few groups as the outliers fill to
    one outlier per group (:func:`compress_kl_ptq.storage.storage_range`). Without outliers both
    bounds are the exact cost."""
    shape = (module.out_features, module.in_features)
    if unit == "params":
        return float(shape[0] * shape[1]), float(shape[0] * shape[1])
    low, high = KLPTQParams(**setting).storage_range(shape, setting["outlier_fraction"])
    return float(low), float(high)


class KLPTQ(LayerMethod):
    """KL-guided statistical pre-calibration (Ghaffari et al., arXiv 2501.09107; AdpQ, arXiv 2405.13358).

    Data-free and weight-adaptive: no calibration data is read. The papers' full texts are not
    available here; what their summaries state is marked (paper), the rest is this
    implementation's design.

    Outliers by adaptive-LASSO soft thresholding (paper). With the adaptive penalty lambda/|w|
    per weight, the soft-thresholded weight sign(w)·max(|w| − lambda/|w|, 0) is non-zero exactly
    when |w| > sqrt(lambda); those weights are the outliers (salient weights), the rest the
    inliers. The threshold only selects: the original values are quantized, not the shrunk
    ones (design). lambda comes from an outlier fraction (one lambda per layer by default, since
    the LASSO problem of the papers has one penalty per weight matrix, or one per group with
    lambda_scope: group) or is given (outlier_lambda). The count is met exactly: a tie at the
    threshold, which no lambda can split, is split deterministically.

    Two grids. Inliers are quantized per group of group_size input columns (per output channel
    with group_size: null) on a bits-bit grid whose range comes from the group's inliers only;
    outliers on a round-to-nearest grid of their own (outlier_bits, default 8: AdpQ's mixed
    precision (paper)), its scale from the group's outliers only. compressed-tensors conventions
    (signed codes, round half to even).

    KL-guided choice of the grid (paper: the quantized weights keep the original's information,
    measured by KL; the estimator and the candidate set are design). Candidates are every pair
    of an outlier fraction (outlier_fraction, one value or a list) and a clip ratio
    (clip_ratios: the inlier range shrunk by the factor, as AWQ's and OmniQuant's clipping
    searches do); the pair of least KL(original ‖ quantized) is kept, among the pairs whose exact
    storage is within bits_per_weight when a budget is given. With clip_scope: group the ratio is
    chosen per group instead (AWQ's clipping search is per group too, on activations): the
    pointwise KL is a sum over groups, so each group's least-error ratio gives the criterion's
    least value over every combination of per-group ratios, at the same storage. The default
    estimator is the pointwise one (compress_kl_ptq.criterion): the KL between the
    Gaussian-smoothed joint distributions of (position, value), which reduces to the weight MSE
    over twice the layer's weight variance. Unlike a KL between the two value distributions, it sees which weight
    moved, penalises clipping and rounding alike, and ranks grids as the layers' output error
    on real activations does (docs/benchmarks.md); the marginal estimators remain selectable.
    Without a budget more outliers always lower the KL, so a list of fractions is meant to be
    used with bits_per_weight (that is its default); with a budget the criterion trades the
    outliers' storage against inlier bits only through what the budget leaves.

    Pseudo-activations (paper, mentioned only in its summary): the output error of a layer is
    E‖(W − Ŵ)x‖² = tr(ΔW E[xxᵀ] ΔWᵀ); with no data, pseudo-activations drawn isotropically
    (E[xxᵀ] = I) give exactly ‖ΔW‖², the criterion used here, so they would only add sampling
    noise. A non-isotropic choice would need a model of the inputs that a data-free method does
    not have; none is implemented.

    The weights are replaced by their dequantized values. context.layers[name] gets
    LayerState("kl_ptq", quant=<inlier grid>, outliers=OutlierSplit(mask, <outlier grid>)).
    Deployment (design, from reading compressed-tensors 0.19 and 0.20, the versions transformers
    and vLLM load). A layer with outliers is a dense grid plus a sparse second grid, and no
    loadable format holds that: a compressed-tensors module has exactly one quantization scheme
    (one scale per group, so outliers cannot keep a scale of their own on the same bit grid);
    its sparse compressors (sparse-bitmask, sparse-24-bitmask, marlin-24) are not in 0.19 or
    0.20 (Sparse24 was dropped after 0.14; the names remain as "legacy" formats), and they only
    stored one tensor without its zeros, never an additive second component; an extra
    sparse tensor per layer is an unexpected key that from_pretrained drops; bitsandbytes'
    outliers are activation columns chosen at run time. So the outlier variant is written only
    by the dense writer (recipe check refuses the others, and the compressed-tensors writer
    refuses a layer state with outliers rather than dropping them). The deployable variant is
    kl_ptq without outliers: outlier_fraction: 0, or a bits_per_weight budget that leaves no
    room for outliers (bits + 16/group_size, rtn's and gptq's storage: the fractions that
    cannot fit are dropped before recipe check asks what the stage produces). The criterion
    then picks each layer's clip ratio, and the checkpoint is plain pack-quantized.

    Report per layer: kl (of the chosen candidate), kl_rtn (the same estimator on plain
    round-to-nearest at the same bits and group size), outlier_fraction, outliers, lambda (the
    median over groups with lambda_scope: group), clip_ratio (the mean over groups with
    clip_scope: group), clip_scope, candidates (candidates tried within the budget),
    relative_error and relative_error_rtn (‖W − Ŵ‖/‖W‖), effective_bits (exact storage per
    weight, compress_kl_ptq.storage) and its parts under storage_bits.
    """

    name = "kl_ptq"
    Params = KLPTQParams
    # the storage depends on the groups the outliers touch, so only bounds from shapes; no BitOps, as
    # the outliers sit on a grid of their own
    offers = CandidateOffer(
        {"group_size": [128], "outlier_fraction": [0.01]},
        costs=frozenset({"bits", "params"}),
        price_range=candidate_cost_range,
    )

    def produces(self) -> Produces:
        # a budget that leaves no room for any outlier makes a plain grid, which every integer
        # format holds (e.g. bits_per_weight = bits + 16/group_size, rtn's and gptq's storage)
        outliers = self.params.outlier_lambda is not None or any(
            f > 0 and self.params.fraction_can_fit(f) for f in self.params.fractions()
        )
        return Produces(quant=self.params.scheme(), outliers=outliers)

    def check_layer(self, name: str, module: nn.Module) -> None:
        budget = self.params.bits_per_weight
        if budget is None or not self.params.fractions():
            return
        shape = (module.weight.shape[0], module.weight[0].numel())
        least, fraction = self.params.least_bits(shape)
        if budget < least:
            raise UserError(budget_message(budget, least, fraction, exact=fraction == 0), name)

    def compress_layer(self, context: Context, name: str, module: nn.Module) -> dict[str, Any]:
        result = quantize_layer(name, module.weight.data, self.params)
        module.weight.data = result.weight
        state = result.state()
        context.update_layer(name, method=state.method, quant=state.quant, outliers=state.outliers)
        return result.report()


def budget_message(budget: float, least: float, fraction: float, exact: bool) -> str:
    """The one line refusing a budget below every candidate."""
    nearest = f"{least:.4f}" if exact else f"at least {least:.4f}"
    return (
        f"bits_per_weight: {budget} cannot be met by any candidate grid: the nearest achievable is "
        f"{nearest} bits per weight (outlier_fraction {fraction})"
    )


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
# the layer


@dataclass
class LayerResult:
    weight: torch.Tensor
    grid: QuantGrid
    mask: torch.Tensor
    outlier_grid: QuantGrid
    report_entries: dict[str, Any]

    def state(self) -> LayerState:
        """The layer's state; no outlier split when the layer holds no outliers."""
        outliers = OutlierSplit(self.mask.cpu(), self.outlier_grid.to("cpu")) if self.mask.any() else None
        return LayerState(method=KLPTQ.name, quant=self.grid.to("cpu"), outliers=outliers)

    def report(self) -> dict[str, Any]:
        return self.report_entries


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def split_outliers(
    weight: torch.Tensor, params: KLPTQParams, fraction: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outlier mask and lambda (a 0-d tensor, or one per group for ``lambda_scope: group``) for
    ``fraction`` of the weights, or for ``params``' fixed lambda or single fraction."""
    w = weight.detach().float()
    if fraction is None and params.outlier_lambda is not None:
        lam = torch.tensor(params.outlier_lambda, dtype=torch.float64, device=w.device)
        return soft_threshold(w, lam)[1], lam
    if fraction is None:
        (fraction,) = params.fractions()
    if params.lambda_scope == "layer":
        count = round(fraction * w.numel())
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
    count = round(fraction * width)
    lam = lambda_for_count(groups.abs(), count)  # (rows, n_groups)
    return top_count_mask(groups.abs(), count).flatten(-2), lam


def top_count_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest magnitudes along the last dimension: exactly the weights that pass the
    soft threshold of ``lambda_for_count``, except that a tie at the threshold (which no lambda
    can split) is split by position, the earlier weights first, so the count is met exactly."""
    order = torch.sort(magnitudes, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(magnitudes, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :count], True)


def clipped_grid(values: torch.Tensor, scheme: QuantScheme, ratio: float) -> QuantGrid:
    """Round-to-nearest's grid of ``values`` (zeros where a weight belongs to the other grid) with
    each group's range shrunk by ``ratio``: the grid of ``ratio × values``, whose scale is
    ``ratio`` times round-to-nearest's and whose zero point is the same."""
    return compute_grid(values * ratio if ratio != 1.0 else values, scheme)


def per_weight_step(grid: QuantGrid, shape: torch.Size) -> torch.Tensor:
    return grid.scale.unsqueeze(-1).expand(shape[0], grid.scale.shape[1], shape[1] // grid.scale.shape[1]).flatten(-2)


def effective_bits(shape: tuple[int, int], mask: torch.Tensor, params: KLPTQParams) -> tuple[float, dict[str, int]]:
    """Exact storage of a layer with outliers ``mask`` in bits per weight, and the parts it adds up from."""
    width = params.group_width(shape[1])
    parts = storage_parts(
        shape,
        width,
        params.bits,
        params.symmetric,
        int(mask.sum()),
        int(group_view(mask, width).any(-1).sum()),
        params.outlier_bits,
        params.outlier_index,
    )
    return sum(parts.values()) / (shape[0] * shape[1]), parts


@dataclass
class Split:
    """One outlier split of a layer: its fraction (None for a fixed lambda), mask, lambda and storage."""

    fraction: float | None
    mask: torch.Tensor
    lam: torch.Tensor
    bits: float
    parts: dict[str, int]


def outlier_splits(name: str, w: torch.Tensor, params: KLPTQParams) -> list[Split]:
    """The candidate splits within the budget; UserError naming the nearest achievable when none is."""
    splits = []
    for fraction in params.fractions() or [None]:
        mask, lam = split_outliers(w, params, fraction)
        bits, parts = effective_bits(tuple(w.shape), mask, params)
        splits.append(Split(fraction, mask, lam, bits, parts))
    budget = params.bits_per_weight
    # a fraction that cannot fit the budget in any layer is not tried where rounding its count down
    # would let it in: produces() has told the writer there are no outliers
    within = [s for s in splits if (budget is None or s.bits <= budget) and params.fraction_can_fit(s.fraction or 0.0)]
    if not within:
        nearest = min(splits, key=lambda s: s.bits)
        fraction = nearest.fraction if nearest.fraction is not None else float(nearest.mask.float().mean())
        raise UserError(budget_message(budget, nearest.bits, fraction, exact=True), name)
    return within


@dataclass
class Trial:
    """One candidate grid of a layer: an outlier split and a clip ratio, and the weight they give."""

    split: Split
    ratio: float
    grid: QuantGrid
    outlier_grid: QuantGrid
    quantized: torch.Tensor

    def steps(self) -> torch.Tensor:
        """Each weight's grid step (the histogram estimator's cell width)."""
        shape = self.quantized.shape
        return torch.where(
            self.split.mask, per_weight_step(self.outlier_grid, shape), per_weight_step(self.grid, shape)
        )


def trials(name: str, w: torch.Tensor, params: KLPTQParams) -> Iterator[Trial]:
    """Every candidate (outlier fraction x clip ratio) of the float32 weight ``w`` within the budget;
    with ``clip_scope: group`` one candidate per outlier fraction, its ratios chosen per group
    (the trial's ``ratio`` is then their mean over the groups)."""
    scheme, outlier_scheme = params.scheme(), params.outlier_scheme()
    for split in outlier_splits(name, w, params):
        inliers = w.masked_fill(split.mask, 0.0)
        outlier_grid = compute_grid(w.masked_fill(~split.mask, 0.0), outlier_scheme)
        outlier_values = outlier_grid.fake_quantize(w)
        if params.clip_scope == "group":
            candidates = [per_group_clip(w, split.mask, inliers, params)]
        else:
            candidates = ((clipped_grid(inliers, scheme, r), r) for r in params.clip_ratios)
        for grid, ratio in candidates:
            quantized = torch.where(split.mask, outlier_values, grid.fake_quantize(w))
            yield Trial(split, ratio, grid, outlier_grid, quantized)


def per_group_clip(
    w: torch.Tensor, mask: torch.Tensor, inliers: torch.Tensor, params: KLPTQParams
) -> tuple[QuantGrid, float]:
    """The inlier grid whose every group has the clip ratio of least squared error over the group's
    inliers (the earlier ratio of ``clip_ratios`` on a tie), and the mean chosen ratio. Each
    group's codes depend only on its own scale and zero point, so the grid assembled from the
    per-group winners reproduces each winner's values exactly."""
    scheme, width = params.scheme(), params.group_width(w.shape[1])
    best = None
    for ratio in params.clip_ratios:
        grid = clipped_grid(inliers, scheme, ratio)
        error = group_view((grid.fake_quantize(w) - w).masked_fill(mask, 0.0).pow(2), width).sum(-1)
        if best is None:
            best = [error, grid.scale, grid.zero_point, torch.full_like(error, ratio)]
            continue
        better = error < best[0]
        best = [
            torch.where(better, error, best[0]),
            torch.where(better, grid.scale, best[1]),
            None if grid.zero_point is None else torch.where(better, grid.zero_point, best[2]),
            best[3].masked_fill(better, ratio),
        ]
    _, scale, zero_point, chosen = best
    return QuantGrid(scheme, scale, zero_point), chosen.mean().item()


def criterion(w: torch.Tensor, trial: Trial, estimator: str, bins: int = 1024) -> float:
    """The KL of ``trial`` against the original weight ``w`` by ``estimator``."""
    return weight_kl(w, trial.quantized, trial.steps() if estimator == "histogram" else None, estimator, bins)


def quantize_layer(name: str, weight: torch.Tensor, params: KLPTQParams) -> LayerResult:
    """Quantize a 2-D weight (not in place); the dequantized weight, both grids, mask and report."""
    if weight.ndim != 2:
        raise UserError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}", name)
    if not torch.isfinite(weight).all():
        raise UserError("weights contain NaN or inf", name)
    check_group_width(params.scheme(), weight.shape[1], name)
    w = weight.detach().float()
    scheme = params.scheme()
    best, tried = None, 0
    for trial in trials(name, w, params):
        kl = criterion(w, trial, params.kl_estimator, params.kl_bins)
        tried += 1
        if best is None or kl < best[0]:
            best = (kl, trial)
    kl, trial = best
    split, quantized = trial.split, trial.quantized

    rtn_grid = compute_grid(w, scheme, name)
    rtn = rtn_grid.fake_quantize(w)
    kl_rtn = weight_kl(w, rtn, per_weight_step(rtn_grid, w.shape), params.kl_estimator, params.kl_bins)

    norm = w.pow(2).sum().clamp_min(1e-24)
    outlier_count = int(split.mask.sum())
    report = {
        "bits": params.bits,
        "outlier_bits": params.outlier_bits,
        "kl": kl,
        "kl_rtn": kl_rtn,
        "kl_estimator": params.kl_estimator,
        "outlier_fraction": outlier_count / w.numel(),
        "outliers": outlier_count,
        "lambda": (split.lam.median() if split.lam.ndim else split.lam).item(),
        "clip_ratio": trial.ratio,
        "clip_scope": params.clip_scope,
        "candidates": tried,
        "relative_error": ((quantized - w).pow(2).sum() / norm).sqrt().item(),
        "relative_error_rtn": ((rtn - w).pow(2).sum() / norm).sqrt().item(),
        "effective_bits": split.bits,
        "storage_bits": split.parts,
    }
    if params.bits_per_weight is not None:
        report["bits_per_weight_budget"] = params.bits_per_weight
    return LayerResult(quantized.to(weight.dtype), trial.grid, split.mask, trial.outlier_grid, report)


# ---------------------------------------------------------------------------------------
# candidates for search methods


def kl_ptq_candidates(name: str, module: nn.Module, request: CandidateRequest) -> list[Candidate]:
    """kl_ptq variants of a Linear layer for each requested ``bits`` (and ``group_size``), with the
    default outlier settings (or ``outlier_fraction`` values when the request lists them); each
    priced at its exact storage (``storage_bits``: codes, scales, outlier values and positions)."""
    candidates = []
    for setting in quantizer_settings(module, request, KLPTQ.offers.defaults):
        result = quantize_layer(name, module.weight.data, KLPTQParams(**setting))
        bits = sum(result.report_entries["storage_bits"].values())
        kept = module.weight.numel()
        cost = weight_cost(request.cost, kept=kept, weight_bits=setting["bits"], storage_bits=bits)
        error = result.report_entries["relative_error"] ** 2
        candidates.append(Candidate(KLPTQ.name, setting, cost, error, result.weight, result.state()))
    return candidates
