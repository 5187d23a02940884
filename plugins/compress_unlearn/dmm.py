"""DMM, datamodel matching (Georgiev, Rinberg, Park, Garg, Ilyas, Madry, Neel 2024, "Attribute-to-Delete:
Machine Unlearning via Datamodel Matching", arXiv 2410.23232), for image classifiers.

1. A datamodel predicts the outputs of the model retrained without the forget set F:
   f̂(x) = f(x) − Σ_{i∈F} β_i(x), with f the model to unlearn and β TRAK's attributions of every
   logit (:mod:`compress_unlearn.trak`), from an ensemble of checkpoints trained on the whole
   training set.
2. The model is fine-tuned to match f̂ on the forget set and a sample of the retain set: mean
   squared error between its logits and f̂'s, Adam at lr 5e-4.

From the reference code (``RoyRin/data-unlearning-bench`` at commit 09aa166; the official
``MadryLab/DMM`` repository could not be fetched, and that snapshot lacks ``oracle_matching.py``
and ``dm_direct.py``, so the details come from their callers): targets f(x) − m·Σβ with m = 1
(``multiplier``), the logit MSE, Adam lr 5e-4, a matching set of F plus 3·|F| random retain
points. Our choices, where the code was unavailable or the loop differs:

- β is computed when the stage starts rather than loaded from a precomputed memmap: TRAK's
  training-side kernel over ``kernel_data`` (the whole training set; unset, forget ∪ retain) for
  each checkpoint, kept in ``kernel_cache`` when given so that several runs over one training set
  pay for it once; the forget set's part and the targets follow in every run;
- the loop reads one batch of forget and one of retain per step; their losses are weighted by the
  sets' sizes so that each matching point counts once, as in the paper's shuffled F ∪ R;
- no exponential learning-rate decay (the reference's ExponentialLR 0.95 per epoch): the loop's
  schedules apply; no L2 pull toward the original weights (an option of the reference, off in its
  callers we could read);
- the images are the data source's, without augmentation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.api import Batch, Context, DataSpec, ModelSpec, Sample, StageRun, TrainParams, UserError, collate
from compress_unlearn.method import Unlearn
from compress_unlearn.metrics import refuse_unknown_entry
from compress_unlearn.trak import Checkpoint, Projector, RemovalPredictor, features, kernel_inverse, output_logits


class DMMParams(TrainParams):
    lr: float = Field(5e-4, gt=0, description="peak learning rate of Adam (the reference's 5e-4)")
    checkpoints: list[ModelSpec] = Field(
        [],
        description="the TRAK ensemble: models trained on the whole training set (other seeds; the model itself "
        "is not added unless listed); unset = the stage's model alone",
    )
    kernel_data: str | None = Field(
        None,
        description="data: entry of the whole training set, over which TRAK's kernel is computed; unset = "
        "forget and retain together",
    )
    kernel_cache: Path | None = Field(
        None,
        description="safetensors file keeping TRAK's kernels: read when its settings match, else (re)written",
    )
    projection_dim: int = Field(2048, gt=0, description="TRAK's projection dimension (the library's default 2048)")
    ridge: float = Field(0.0, ge=0, description="λ added to TRAK's kernel (the library's lambda_reg, default 0)")
    projection_seed: int = Field(0, ge=0, description="seed of TRAK's random projection")
    multiplier: float = Field(1.0, gt=0, le=100, description="m in f(x) − m·Σβ (the reference's 1)")
    attribution_batch_size: int = Field(64, gt=0, description="images per batch of per-example gradients")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return [{"name": item} if isinstance(item, str) else item for item in value]


class DMM(Unlearn):
    """Datamodel matching (Georgiev et al. 2024): TRAK predicts the logits of the model retrained
    without the forget set, f(x) − Σ_{i∈forget} β_i(x), from an ensemble of ``checkpoints``; the
    model is then fine-tuned (Adam) to match those logits (mean squared error) on the forget and
    retain images, each set weighted by its size. For image classifiers (``source: images``)."""

    name = "dmm"
    Params = DMMParams
    params: DMMParams
    default_targets: ClassVar[list[str]] = ["Conv2d", "Linear", "BatchNorm2d"]  # the whole network, as the paper
    default_ignore: ClassVar[list[str]] = []

    def __init__(self, params: DMMParams) -> None:
        super().__init__(params)
        self.original: nn.Module | None = None
        self.predictor: RemovalPredictor | None = None
        self.forget_share = 0.0

    def check_data(self, data: dict[str, DataSpec]) -> None:
        super().check_data(data)
        entries = list(self.data_names().values())
        if self.params.kernel_data is not None:
            refuse_unknown_entry(self.params.kernel_data, data, "kernel_data")
            entries.append(self.params.kernel_data)
        for entry in entries:
            if data[entry].source != "images":
                raise UserError(
                    f"dmm attributes an image classifier's logits, but data: {entry}: has source {data[entry].source!r}"
                    " (use source: images)",
                    "data",
                )

    def configure_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=self.params.lr, weight_decay=self.params.weight_decay)

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        names = self.data_names()
        forget, retain = context.data(names["forget"]), context.data(names["retain"])
        self.forget_share = len(forget) / (len(forget) + len(retain))
        self.original = copy.deepcopy(context.model).eval().requires_grad_(False)
        models = [context.load_model(spec) for spec in self.params.checkpoints] or [self.original]
        checkpoints = [Checkpoint(model.to(device)) for model in models]
        sizes = {checkpoint.size for checkpoint in checkpoints}
        if len(sizes) > 1:
            raise UserError(f"the checkpoints differ in parameter count ({sorted(sizes)})", "checkpoints")
        projector = Projector(sizes.pop(), self.params.projection_dim, self.params.projection_seed, device)
        kernels = self.kernels(context, checkpoints, projector, [*forget, *retain])
        self.predictor = RemovalPredictor(checkpoints, projector, kernels, self.batches(forget, device))
        run.record.details["trak"] = {"checkpoints": len(checkpoints), "projection_dim": projector.dim}

    def kernels(
        self, context: Context, checkpoints: list[Checkpoint], projector: Projector, default: list[Sample]
    ) -> list[torch.Tensor]:
        """Each checkpoint's (ΦᵀΦ + λI)⁻¹ over the training set: from ``kernel_cache`` when its settings match."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        kernel_data = self.params.kernel_data
        entries = [kernel_data] if kernel_data else list(self.data_names().values())
        settings = json.dumps(
            {
                "checkpoints": [spec.name for spec in self.params.checkpoints] or [context.recipe.model.name],
                "kernel_data": [context.recipe.data[entry].model_dump(mode="json") for entry in entries],
                "projection": [projector.dim, self.params.projection_seed, projector.device.type],
                "ridge": self.params.ridge,
            },
            sort_keys=True,
        )
        cache = self.params.kernel_cache
        if cache is not None and cache.is_file():
            with safe_open(cache, "pt") as stored:
                if stored.metadata().get("settings") == settings:
                    return [stored.get_tensor(f"kernel.{m}").to(projector.device) for m in range(len(checkpoints))]
        samples = context.data(kernel_data) if kernel_data else default
        kernels = []
        for checkpoint in checkpoints:
            phi, _ = features(checkpoint, projector, self.batches(samples, projector.device))
            kernels.append(kernel_inverse(phi, self.params.ridge))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tensors = {f"kernel.{m}": kernel.cpu().contiguous() for m, kernel in enumerate(kernels)}
            save_file(tensors, cache, metadata={"settings": settings})
        return kernels

    def batches(self, samples: list[Sample], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        size = self.params.attribution_batch_size
        batches = [collate(samples[start : start + size], 0) for start in range(0, len(samples), size)]
        return [(batch["pixel_values"].to(device), batch["labels"].to(device)) for batch in batches]

    def finish(self, context: Context, run: StageRun) -> None:
        self.original = self.predictor = None

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """f(x) − m·Σβ(x): the datamodel's prediction of the retrained model's logits."""
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            pixel_values = pixel_values.float()
            current = output_logits(self.original(pixel_values=pixel_values)).float()
            return current + self.params.multiplier * self.predictor.change(pixel_values)

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        values = {}
        for name in ("forget", "retain"):
            pixels = batches[name]["pixel_values"]
            logits = output_logits(model(pixel_values=pixels)).float()
            values[name] = (logits - self.targets(pixels)).pow(2).mean()
        total = self.forget_share * values["forget"] + (1 - self.forget_share) * values["retain"]
        return total, {name: value.item() for name, value in values.items()}
