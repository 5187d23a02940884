"""FIMA-Q (Wang et al., CVPR 2025, "FIMA-Q: Post-Training Quantization for Vision Transformers
by Fisher Information Matrix Approximation"; code: github.com/ShiheWang/FIMA-Q) as a
sequential calibration method: parameters and the block-by-block driver. The losses are in
``losses.py``, the weight rounding in ``rounding.py``, the activation points in ``points.py``,
RepQ-ViT's folding of per-channel post-LayerNorm ranges into the LayerNorm in ``reparam.py``
(done at the start of each block, before its weight grids are searched, as the code does).

What follows the code (``utils/block_recon.py``): each block is reconstructed on its own
with AdaRound weights and learned activation step sizes (Adam, lr 1e-3 for the rounding
variables, 4e-5 cosine-annealed to 0 for the activation scales), batch 32, QDrop with
probability 0.5 (element-wise, the block input is the quantized stream's or the
full-precision stream's; inside the block each quantizer passes half its elements
unquantized); the Fisher loss is refreshed every ``iterations / rank`` iterations: the
block, quantized as it is then, runs on the full-precision inputs, the rest of the model
(full precision after it) gives the gradient of ``KL(softmax(f(x)/20) || softmax(f̂(x)/20))``
at the block output (``compress.api.gradients_after_block``), and one row of ``G`` (mean
|gradient|) and of ``D`` (mean |ẑ - z|) is added.

Where this differs: the paper runs 20,000 iterations per block; the default here is 2,000
(``iterations``) to keep a run in minutes. The blocks outside the repeated layers (patch
embedding, classifier) are reconstructed after the blocks, because the engine hands them
over then (FIMA-Q does the patch embedding first, so its blocks see its quantized output);
the patch embedding is fitted with ``mse``, the classifier with KL as the code's head. The
default targets are the Linear layers; add ``Conv2d`` for a ViT's patch embedding.
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
    chunks,
    collate,
    compute_grid,
    gradients_after_block,
    hidden_states,
    move,
    stack_inputs,
    weight_matrix,
    with_hidden_states,
)
from compress_fimaq.losses import FisherFactors, ReconstructionLoss, rounding_penalty, temperature
from compress_fimaq.points import block_point_names, grouped, initial_point, observe, per_token, search_range
from compress_fimaq.reparam import fold, foldable
from compress_fimaq.rounding import attach, searched_grid, settle_rounding

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
        8, ge=2, le=8, description="Bits of the input of convolutions (the patch embedding); FIMA-Q keeps 8."
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
        description="Search activation ranges between percentiles and weight clipping per row; false: "
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
    search_steps: int = Field(100, ge=1, description="Candidates between the percentiles (FIMA-Q: eq_n = 100).")
    weight_search_steps: int = Field(20, ge=1, description="Clipping ratios tried per weight row.")
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
        self._targets: list[torch.Tensor] | None = None

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
        self._targets = None
        try:
            yield
        finally:
            self._quantization.close()
            self._quantization = None
            self._targets = None

    def compress_block(self, context: Context, work: BlockWork) -> dict[str, dict[str, Any]]:
        start = time.perf_counter()
        block = Block(context, work, self.params)
        points = block.initial_points()
        self._quantization.add(points)
        fisher = None
        outside = work.block in work.targets.values()
        if self.params.reconstruct and not outside and self.params.loss != "mse":
            if self._targets is None:
                self._targets = block.output_targets()
            fisher = partial(block.fisher_row, self._targets)
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
        observed = self.q_inputs[: params.search_samples]
        seen = observe(
            self.context.model,
            names,
            lambda: [self.forward(observed[part]) for part in self.parts() if part.start < observed.shape[0]],
        )
        values, after_norm = seen.values, seen.after_norm
        if params.channel_inputs and params.reparameterize_layernorm and not self.outside:
            self.fold_norms(values, after_norm, seen.consumers)
        modules = dict(self.context.model.named_modules())
        points = {}
        for name, x in values.items():
            module_name, _, site = name.rpartition(":")
            bits = params.activation_bits
            granularity = "head"
            if site == "input":
                convolution = isinstance(modules[module_name], nn.Conv2d)
                bits = params.embedding_activation_bits if convolution else bits
                channel = params.channel_inputs and name in after_norm and module_name not in self.folded
                granularity = "channel" if channel else "tensor"
            grid = params.probs_grid if site == "probs" else "uniform"
            scheme = PointScheme(bits=bits, grid=grid, granularity=granularity)
            point = initial_point(x, scheme, params.search_steps if params.range_search else None, self.generator)
            token_wise = params.token_scales and granularity in ("tensor", "head") and x.ndim in (3, 4)
            points[name] = per_token(point, x) if token_wise and not self.outside else point
        for name, module in work.targets.items():
            weight = weight_matrix(module.weight)
            if params.range_search:
                self.grids[name] = searched_grid(weight, params.scheme(), params.weight_search_steps)
            else:
                self.grids[name] = compute_grid(weight, params.scheme(), name)
        return points

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
            steps = params.search_steps if params.range_search else None
            scale, zero = search_range(grouped(values[points[0]], "channel"), scheme, steps, self.generator)
            folded = fold(modules[norm], [modules[n] for n in layers], scale, zero)
            for point, layer in zip(points, layers, strict=True):
                values[point] = folded.apply(values[point])
                self.folded[layer] = norm

    def output_targets(self) -> list[torch.Tensor]:
        """The full-precision model's output probabilities at the Fisher's temperature, per
        sample, on the host (float16 for token sequences: samples x tokens x vocabulary values);
        from the first block, before it changes."""
        samples = self.context.data("calibration")
        outputs = list(self.fp_outputs.split(1))
        targets = []
        with torch.no_grad(), after_block(self.context.model, self.work.index, self.device, self.returns_tuple) as run:
            for chunk in chunks(samples, outputs, self.params.fisher_batch_size):
                batch = move(collate([samples[position] for position in chunk], 0), self.device)
                hidden = torch.cat([outputs[position] for position in chunk])
                logits = run(batch, hidden).logits
                probs = torch.softmax(logits.float() / self.params.temperature, -1)
                targets.extend(probs.to("cpu", torch.float16 if probs.ndim > 2 else torch.float32).split(1))
        return targets

    def fisher_row(self, targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One refresh: mean |∂KL/∂z| and mean |ẑ - z| over the calibration samples, with the
        block as it is now run on the full-precision inputs."""
        samples = self.context.data("calibration")
        with torch.no_grad():
            quantized = torch.cat([self.forward(self.fp_inputs[part]) for part in self.parts()])
        temperature_ = self.params.temperature

        def kl(output: Any, _batch: Any, chunk: range) -> torch.Tensor:
            log_probs = torch.log_softmax(output.logits.float() / temperature_, -1)
            target = torch.cat([targets[position] for position in chunk]).to(log_probs.device, torch.float32)
            return (target * (target.clamp(min=1e-30).log() - log_probs)).sum()

        gradients = gradients_after_block(
            self.context.model,
            self.work.index,
            list(quantized.split(1)),
            samples,
            kl,
            self.device,
            self.returns_tuple,
            self.params.fisher_batch_size,
        )
        gradient_row = torch.cat(gradients).to(self.device).abs().reshape(self.samples, -1).mean(0)
        difference_row = (quantized - self.fp_outputs).abs().reshape(self.samples, -1).float().mean(0)
        return gradient_row, difference_row

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
        if self.outside:  # the classifier fits the FP softmax (the code's head); the patch embedding its output
            loss_fn = ReconstructionLoss("kl" if isinstance(self.work.block, nn.Linear) else "mse")
        else:
            loss_fn = ReconstructionLoss(params.loss)
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
