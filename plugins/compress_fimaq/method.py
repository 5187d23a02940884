"""FIMA-Q (Wang et al., CVPR 2025, "FIMA-Q: Post-Training Quantization for Vision Transformers
by Fisher Information Matrix Approximation"; code: github.com/ShiheWang/FIMA-Q) as a
sequential calibration method: parameters and the block-by-block driver. The losses are in
``losses.py``, the Fisher refresh in ``fisher.py``, the weight grids' search in ``grids.py``, the
Linear inputs' ranges (searched in turn with the weight grids) in ``inputs.py``, the patch
embedding's in ``patch.py``,
the weight rounding in ``rounding.py``, the activation points in ``points.py``, RepQ-ViT's
folding of per-channel post-LayerNorm ranges into the LayerNorm in ``reparam.py`` (done at
the start of each block, before its weight grids are searched, as the code does).

What follows the code (``utils/block_recon.py``): the patch embedding is reconstructed first
(the engine hands targets the forward pass reaches before the blocks over first), then each
block, then the classifier; each on its own with AdaRound weights and learned activation step
sizes (Adam, lr 1e-3 for the rounding variables, 4e-5 cosine-annealed to 0 for the
activation scales), batch 32, QDrop with probability 0.5 (element-wise, the block input is
the quantized stream's or the full-precision stream's; inside the block each quantizer
passes half its elements unquantized); the Fisher loss is refreshed every
``iterations / rank`` iterations: the block, quantized as it is then, runs on the
full-precision inputs, the rest of the model (full precision after it) gives the gradient of
``KL(softmax(f(x)/20) || softmax(f̂(x)/20))`` at the block output (``compress.api.after_block``;
``after_module`` at the patch embedding's output), and one row of ``G`` (mean |gradient|) and
of ``D`` (mean |ẑ - z|) is added. The patch embedding takes the recipe's loss, as in the code
(only its ``head`` differs), on the images themselves (the code's ``quanted_input = raw_input``
for ``patch_embed``), its input unquantized at 8 bits (``patch.py``); the classifier fits the
full-precision softmax (KL), the code's head.

Where this differs: the paper runs 20,000 iterations per block; the default here is 2,000
(``iterations``) to keep a run in minutes. The Fisher refresh streams over the calibration
samples instead of keeping every sample's gradient and target (``fisher.py``). The default
targets are the Linear layers; add ``Conv2d`` for a ViT's patch embedding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.api import (
    ActivationPoint,
    BlockMethod,
    BlockWork,
    Context,
    DataSpec,
    PointQuantization,
    PointScheme,
    Produces,
    QuantParams,
    StageRun,
    UserError,
    after_block,
    after_module,
    collate,
    compute_grid,
    hidden_states,
    move,
    point_name,
    stack_inputs,
    weight_matrix,
    with_hidden_states,
)
from compress_fimaq.fisher import fisher_rows
from compress_fimaq.grids import searched_grid
from compress_fimaq.inputs import channel_point, search_linear, self_search
from compress_fimaq.losses import FisherFactors, ReconstructionLoss, rounding_penalty, temperature
from compress_fimaq.patch import search_conv
from compress_fimaq.points import block_point_names, grouped, initial_point, observe, per_token, search_range
from compress_fimaq.reparam import fold, foldable
from compress_fimaq.rounding import attach, settle_rounding

Site = Literal["input", "query", "key", "value", "probs"]


class FimaqParams(QuantParams):
    """Parameters of ``fimaq``: the weight grid (asymmetric, per output row, as FIMA-Q's code),
    the activation points, and the reconstruction."""

    granularities = ("channel",)

    bits: int = Field(4, ge=2, le=8, description="Bits per weight (2-8).")
    symmetric: bool = Field(False, description="Symmetric weight grid; FIMA-Q's is asymmetric.")
    granularity: Literal["channel"] = Field("channel", description="One weight scale per output row.")
    group_size: None = Field(None, description="Not used: weights have one scale per output row.")
    activation_bits: int = Field(4, ge=2, le=8, description="Bits of every activation point (2-8).")
    embedding_activation_bits: int = Field(
        8,
        ge=2,
        le=8,
        description="Bits of the input of convolutions (the patch embedding). At 8 (FIMA-Q's qconv_a_bit) the "
        "image is not quantized, as in FIMA-Q's code; below, a symmetric per-tensor scale searched with the weight.",
    )
    points: list[Site] = Field(
        ["input", "query", "key", "value", "probs"],
        description="Where activations are quantized: the inputs of the targeted layers, and in every "
        "attention module the query, key and value and the post-softmax probabilities.",
    )
    probs_grid: Literal["uniform", "log2"] = Field(
        "uniform", description="Grid of the probabilities: uniform (FIMA-Q's code) or log2 (its baselines')."
    )
    token_scales: bool = Field(
        True,
        description="After the search, one learned scale per token position (per head at attention "
        "points), as FIMA-Q's code; needs inputs of one length (images; not variable-length text).",
    )
    channel_inputs: bool = Field(
        True,
        description="Layer inputs taken straight from a normalization get one range per channel "
        "(RepQ-ViT's), searched before the reparameterization below.",
    )
    reparameterize_layernorm: bool = Field(
        True,
        description="Fold those per-channel ranges into the LayerNorm's affine and the Linears reading it "
        "(RepQ-ViT's reparameterization, on in FIMA-Q's code): the float model is unchanged and the input "
        "is then quantized per tensor. A normalization that cannot take the fold (RMSNorm, no bias) keeps "
        "its per-channel ranges.",
    )
    loss: Literal["mse", "diag", "lowrank", "dplr"] = Field(
        "dplr",
        description="Reconstruction loss: output MSE, the Fisher's diagonal (BRECQ-like), its low-rank "
        "part, or FIMA-Q's diagonal plus low rank (DPLR).",
    )
    rank: int = Field(5, ge=1, description="k: Fisher refreshes per block (the low-rank part's rank).")
    range_search: bool = Field(
        True,
        description="Search activation ranges between percentiles and weight grids per row (grids.py); false: "
        "min-max ranges and round-to-nearest grids (the rtn baseline, with reconstruct: false).",
    )
    reconstruct: bool = Field(True, description="false: searched ranges and nearest rounding only (no reconstruction).")
    iterations: int = Field(2000, ge=1, description="Iterations per block (the paper: 20,000).")
    batch_size: int = Field(32, ge=1, description="Calibration samples per iteration.")
    fisher_batch_size: int = Field(128, ge=1, description="Samples per chunk of a Fisher refresh's gradient pass.")
    weight_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the rounding variables.")
    activation_lr: float = Field(4e-5, ge=0, description="Adam learning rate of the activation scales (cosine to 0).")
    round_weight: float = Field(0.01, ge=0, description="λ of the rounding regularizer.")
    b_range: tuple[float, float] = Field((20.0, 2.0), description="Regularizer exponent b, from start to end.")
    warmup: float = Field(0.2, ge=0, lt=1, description="Fraction of iterations without the rounding term.")
    drop_prob: float = Field(0.5, ge=0, le=1, description="QDrop: probability an element is quantized.")
    temperature: float = Field(20.0, gt=0, description="Softmax temperature of the Fisher's KL.")
    search_steps: int = Field(
        128,
        ge=1,
        description="Range candidates of an activation point (FIMA-Q's eq_n = 128): between the 0.99 and 0.99999 "
        "percentiles (attention), spreads times zero points (Linear inputs; inputs.py), 0.01-1.2 times the "
        "max-based scale (convolution input below 8 bits; patch.py).",
    )
    weight_candidates: int = Field(
        128, ge=1, description="Scale and zero-point candidates per weight row (FIMA-Q's eq_n = 128; grids.py)."
    )
    search_rounds: int = Field(
        3,
        ge=0,
        description="Rounds of the weight search, then the Linear input's, on the layer's output error "
        "(FIMA-Q's search_round = 3).",
    )
    search_samples: int = Field(128, ge=1, description="Calibration samples observed for the range search.")
    seed: int = Field(3407, description="Seed of the batch draws and QDrop masks (FIMA-Q's seed).")

    @model_validator(mode="after")
    def _fold_needs_channel_ranges(self) -> Self:
        asked = "reparameterize_layernorm" in self.model_fields_set and self.reparameterize_layernorm
        if asked and (not self.channel_inputs or "input" not in self.points):
            raise ValueError(
                "reparameterize_layernorm folds the per-channel ranges of layer inputs into the LayerNorm: "
                "it needs channel_inputs: true and 'input' in points"
            )
        return self


class Fimaq(BlockMethod):
    """FIMA-Q: block reconstruction with a Fisher-information loss (diagonal plus low rank),
    quantizing weights and activations (layer inputs and the attention matmul operands).

    Each block's weights get learned rounding (AdaRound) on a per-row grid, its activation
    points (layer inputs; query, key, value and probabilities in attention) percentile-searched
    static scales, then learned; the loss weights the block's output error by a diagonal
    plus low-rank approximation of the Fisher information of the KL between the full-precision
    and the quantized model, refreshed ``rank`` times from the gradients at the block output.
    The activation points are recorded (``Context.points``): evaluation computes through them,
    and only output format ``dense`` takes them (listing them for a runtime).
    """

    name = "fimaq"
    Params = FimaqParams
    supported_modules = (nn.Linear, nn.Conv2d)
    needs_original_inputs = True

    def __init__(self, params: FimaqParams) -> None:
        super().__init__(params)
        self._quantization: PointQuantization | None = None

    def produces(self) -> Produces:
        return Produces(quant=self.params.scheme(), activation_points=tuple(self.params.points))

    def check_data(self, data: dict[str, DataSpec]) -> None:
        super().check_data(data)
        samples = data["calibration"].samples
        if samples < self.params.batch_size:
            raise UserError(
                f"fimaq draws batches of {self.params.batch_size} calibration samples, but data: calibration: "
                f"has {samples}: lower batch_size or raise samples"
            )

    @contextmanager
    def around_stage(self, context: Context, run: StageRun) -> Iterator[None]:
        self._quantization = PointQuantization(context.model)
        try:
            yield
        finally:
            self._quantization.close()
            self._quantization = None

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        start = time.perf_counter()
        block = Block(context, work, self.params)
        points = block.initial_points()
        if not points and not work.targets:  # a block the recipe's targets skip: nothing to calibrate
            return {}
        self._quantization.add(points)
        fisher = None
        if self.params.reconstruct and block.loss_kind() not in ("mse", "kl"):
            fisher = block.fisher_row
        history = block.reconstruct(points, fisher) if self.params.reconstruct else block.round_to_nearest()
        for name, point in points.items():
            context.points[name] = point
        seconds = time.perf_counter() - start
        reports = {}
        for name, grid in block.grids.items():
            context.update_layer(name, method=self.name, quant=grid.to("cpu"))
            reports[name] = {"block_seconds": round(seconds, 3), **history}
            if name in block.folded:
                reports[name]["folded_norm"] = block.folded[name]
        return reports


class Block:
    """One block (or one target outside the blocks) under reconstruction."""

    def __init__(self, context: Context, work: BlockWork, params: FimaqParams) -> None:
        self.context, self.work, self.params = context, work, params
        self.device = work.device
        self.outside = work.block in work.targets.values()
        self.leading = self.outside and work.index < 0  # before the blocks: the patch embedding
        self.generator = torch.Generator(self.device).manual_seed(params.seed + work.index)
        original = work.original_inputs if work.original_inputs is not None else work.inputs
        try:
            self.fp_args, self.kwargs = move(stack_inputs(original), self.device)
            q_args, q_kwargs = move(stack_inputs(work.inputs), self.device)
        except ValueError:
            raise UserError(
                "fimaq batches the calibration samples: they must have one length (and share every other "
                "block argument)",
                work.name,
            ) from None
        self.fp_inputs = hidden_states(self.fp_args, self.kwargs)
        self.q_inputs = hidden_states(q_args, q_kwargs)
        self.samples = self.fp_inputs.shape[0]
        self.returns_tuple = False
        with torch.no_grad():
            self.fp_outputs = torch.cat([self.forward(self.fp_inputs[part]) for part in self.parts()])
        self.grids = {}
        self.roundings = {}
        self.folded: dict[str, str] = {}

    def parts(self) -> list[slice]:
        step = self.params.batch_size
        return [slice(start, start + step) for start in range(0, self.samples, step)]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = with_hidden_states(self.fp_args, self.kwargs, hidden)
        output = self.work.block(*args, **kwargs)
        self.returns_tuple = isinstance(output, tuple)
        return output[0] if self.returns_tuple else output

    def initial_points(self) -> dict[str, ActivationPoint]:
        """The block's points with searched ranges (per-token where asked), before any weight changes."""
        params, work = self.params, self.work
        names = block_point_names(self.context.model, work.name, work.block, work.targets, params.points)
        inputs = {name: point_name(name, "input") for name in work.targets}  # the weight search reads them
        observed = self.q_inputs[: params.search_samples]
        seen = observe(
            self.context.model,
            list(dict.fromkeys([*names, *inputs.values()])),
            lambda: [self.forward(observed[part]) for part in self.parts() if part.start < observed.shape[0]],
        )
        values, after_norm = seen.values, seen.after_norm
        folding = params.channel_inputs and params.reparameterize_layernorm and "input" in params.points
        if folding and not self.outside:
            self.fold_norms(values, after_norm, seen.consumers)
        modules = dict(self.context.model.named_modules())
        points = {}
        for name in names:
            x = values[name]
            module_name, _, site = name.rpartition(":")
            bits, granularity, convolution = params.activation_bits, "head", False
            if site == "input":
                convolution = isinstance(modules[module_name], nn.Conv2d)
                bits = params.embedding_activation_bits if convolution else bits
                if convolution and bits >= 8:  # FIMA-Q's conv quant_input passes 8-bit inputs unchanged (patch.py)
                    continue
                channel = params.channel_inputs and name in after_norm and module_name not in self.folded
                granularity = "channel" if channel else "tensor"
            grid = params.probs_grid if site == "probs" else "uniform"
            scheme = PointScheme(bits=bits, grid=grid, granularity=granularity)
            if site == "input" and params.range_search:
                point = self.searched_input(modules[module_name], module_name, x, scheme)
            else:
                point = initial_point(x, scheme, params.search_steps if params.range_search else None, self.generator)
            token_wise = params.token_scales and granularity in ("tensor", "head") and x.ndim in (3, 4)
            points[name] = per_token(point, x) if token_wise and not self.outside else point
        for name, module in work.targets.items():
            if name in self.grids:  # searched with its input above
                continue
            weight = weight_matrix(module.weight)
            if not params.range_search:
                self.grids[name] = compute_grid(weight, params.scheme(), name)
                continue
            x, point = values[inputs[name]], points.get(inputs[name])
            with torch.no_grad():
                x_hat = x if point is None else point(x)
            # FIMA-Q's conv search stops after one round when its input is 8-bit (grids.py)
            eight_bit = isinstance(module, nn.Conv2d) and params.embedding_activation_bits >= 8
            rounds = min(params.search_rounds, 1) if eight_bit else params.search_rounds
            self.grids[name] = searched_grid(
                module, weight, params.scheme(), params.weight_candidates, rounds, x, x_hat
            )
        return points

    def searched_input(self, module: nn.Module, name: str, x: torch.Tensor, scheme: PointScheme) -> ActivationPoint:
        """The input point of ``module`` searched in turn with its weight grid (kept in
        ``self.grids``): a convolution's below 8 bits (``patch.py``), a Linear's per tensor
        (``inputs.py``); a Linear's per channel on the input's own error."""
        params = self.params
        if scheme.granularity == "channel":
            return channel_point(x, scheme, params.search_steps)
        search = search_conv if isinstance(module, nn.Conv2d) else search_linear
        weight = weight_matrix(module.weight)
        result = search(
            module,
            weight,
            params.scheme(),
            params.weight_candidates,
            x,
            scheme,
            params.search_steps,
            params.search_rounds,
        )
        self.grids[name] = result.grid
        return result.point

    def fold_norms(
        self, values: dict[str, torch.Tensor], after_norm: dict[str, str], consumers: dict[str, set[str]]
    ) -> None:
        """RepQ-ViT's fold (``reparam.py``) of each LayerNorm of the block whose output only the
        block's targeted Linears read: their shared input's per-channel ranges are searched, folded
        into the LayerNorm and those Linears, and the observed ``values`` transformed to match;
        ``self.folded`` records layer name to LayerNorm name."""
        params, modules = self.params, dict(self.context.model.named_modules())
        readers: dict[str, list[str]] = {}
        for point, norm in after_norm.items():
            if norm.startswith(self.work.name + "."):
                readers.setdefault(norm, []).append(point)
        for norm, points in readers.items():
            layers = [point.rpartition(":")[0] for point in points]
            if consumers.get(norm, set()) != set(layers) or not foldable(modules[norm], [modules[n] for n in layers]):
                continue
            scheme = PointScheme(bits=params.activation_bits, granularity="channel")
            channels = grouped(values[points[0]], "channel")
            if params.range_search:
                scale, zero = self_search(channels, scheme, params.search_steps)
            else:
                scale, zero = search_range(channels, scheme, None, self.generator)
            folded = fold(modules[norm], [modules[n] for n in layers], scale, zero)
            for point, layer in zip(points, layers, strict=True):
                values[point] = folded.apply(values[point])
                self.folded[layer] = norm

    def fisher_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One refresh (``fisher.py``): mean |∂KL/∂ẑ| and mean |ẑ - z| over the calibration
        samples, with the block as it is now run on the full-precision inputs."""
        samples = self.context.data("calibration")

        def batch(part: slice) -> Any:
            return move(collate(samples[part], 0), self.device)

        if self.leading:
            after = partial(after_module, self.context.model, self.work.block, self.device)
        else:
            after = partial(after_block, self.context.model, self.work.index, self.device, self.returns_tuple)
        params = self.params
        return fisher_rows(
            after, self.forward, self.fp_inputs, self.fp_outputs, batch, params.temperature, params.fisher_batch_size
        )

    def loss_kind(self) -> str:
        """The reconstruction loss: the recipe's, also before the blocks (the code's patch
        embedding); after them, KL to the full-precision softmax for a Linear (the code's head),
        else the output MSE."""
        if not self.outside or self.leading:
            return self.params.loss
        return "kl" if isinstance(self.work.block, nn.Linear) else "mse"

    def round_to_nearest(self) -> dict[str, Any]:
        """Without reconstruction: each weight rounded to the nearest point of its grid."""
        with torch.no_grad():
            for name, module in self.work.targets.items():
                weight = weight_matrix(module.weight)
                weight.copy_(self.grids[name].fake_quantize(weight))
        return {}

    def reconstruct(self, points: dict[str, ActivationPoint], fisher_row) -> dict[str, Any]:
        """The reconstruction loop; leaves hard-rounded weights and the learned points."""
        params = self.params
        modules = self.work.targets
        for name, module in modules.items():
            self.roundings[name] = attach(module, self.grids[name])
        scales = [point.scale for point in points.values()]
        for point in points.values():
            point.scale.requires_grad_(True)
            point.drop = 1 - params.drop_prob
        weight_optimizer = torch.optim.Adam(
            [rounding.alpha for rounding in self.roundings.values()], lr=params.weight_lr
        )
        scale_optimizer = torch.optim.Adam(scales, lr=params.activation_lr) if scales else None
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(scale_optimizer, T_max=params.iterations, eta_min=0.0)
            if scale_optimizer
            else None
        )
        loss_fn = ReconstructionLoss(self.loss_kind())
        factors = FisherFactors()
        every = max(params.iterations // params.rank, 1)
        first = last = None
        try:
            for step in range(params.iterations):
                if fisher_row is not None and step % every == 0 and factors.rank < params.rank:
                    factors.add(*fisher_row())
                    loss_fn.reset()
                batch = torch.randperm(self.samples, generator=self.generator, device=self.device)[: params.batch_size]
                quantized, full = self.q_inputs[batch], self.fp_inputs[batch]
                mask = torch.rand(quantized.shape, generator=self.generator, device=self.device) < params.drop_prob
                output = self.forward(torch.where(mask, quantized, full))
                loss = loss_fn(output, self.fp_outputs[batch], factors)
                b = temperature(step + 1, params.iterations, params.warmup, *params.b_range)
                total = loss
                if b is not None:
                    total = loss + rounding_penalty(
                        [rounding.rounding() for rounding in self.roundings.values()], params.round_weight, b
                    )
                weight_optimizer.zero_grad()
                if scale_optimizer:
                    scale_optimizer.zero_grad()
                total.backward()
                weight_optimizer.step()
                if scale_optimizer:
                    scale_optimizer.step()
                    schedule.step()
                with torch.no_grad():
                    for scale in scales:
                        scale.clamp_(min=1e-8)
                first = loss.detach() if first is None else first
                last = loss.detach()
        finally:
            for name, module in modules.items():
                settle_rounding(module, self.roundings[name])
            for point in points.values():
                point.scale.requires_grad_(False)
                point.drop = 0.0
        losses = {"loss_first": first.item(), "loss_last": last.item()}
        return {**losses, "fisher_rank": factors.rank, "loss": loss_fn.kind}
