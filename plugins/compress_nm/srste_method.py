"""The ``srste`` training method: N:M sparse training with SR-STE on the shared loop."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from compress.api import Batch, Context, Produces, StageRun, TrainingMethod, TrainParams, UserError, onloaded
from compress_nm.params import SparsityParams
from compress_nm.patterns import NMPattern
from compress_nm.srste import attach, bake, dense_weight, nm_mask, sparse_architecture_divergence

STATE_KEY = "srste"


class SRSTEParams(TrainParams):
    pattern: str = Field("2:4", description="N:M: keep N of every M consecutive input weights (N < M)")
    lambda_w: float = Field(
        2e-4,
        ge=0,
        description="weight of the sparse-refined term λ_w (1 − mask) ⊙ W added to the pruned weights' "
        "gradient (the paper's and official code's 2e-4); 0 = plain straight-through (STE)",
    )
    loss: Literal["ce", "forward_kl"] = Field(
        "ce",
        description="ce: next-token cross-entropy on the data (the paper's task loss); forward_kl: "
        "KL(original ‖ sparse) of the next-token distributions at every non-padding position, the "
        "original (uncompressed) model as teacher (recovery after one-shot pruning)",
    )

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return str(NMPattern.parse(value))


class SRSTE(TrainingMethod):
    """N:M sparse training with the sparse-refined straight-through estimator (SR-STE).

    Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
    ICLR 2021 (code: NM-sparsity/NM-sparsity). At every forward pass each targeted layer's
    mask is recomputed from its dense weights (the N largest |w| of every M consecutive
    input weights are kept); gradients pass straight through to the dense weights, and
    ``lambda_w (1 − mask) ⊙ W`` is added to the gradient of the pruned ones. When training
    ends the masks are baked into the weights, which then hold the N:M pattern (recorded in
    the checkpoint's sparsity metadata).

    The stage may start from a dense model or from a one-shot pruning stage's result
    (``sparsegpt`` at 2:4, then ``srste``): the host's fixed-mask straight-through steps
    aside (``straight_through = False``), the zeros left by the earlier stage are where the
    masks start, and they may move. Layers an earlier stage quantized are refused: quantize
    after ``srste``.

    The report records the sparse architecture divergence (SAD: the fraction of mask
    entries that changed) at every log point, from the start and since the previous log
    point (``sad_curve``: ``[step, since_start, since_previous]``), and per layer at the end.
    The masks it compares live in ``context.state["srste"]`` during the stage only, so a
    resumed run (``--resume``) continues the same curve.

    What is ours: the optimizer is the loop's AdamW (the paper trains with SGD and momentum,
    to which the refined term is added as gradient); ``forward_kl`` recovery is a choice of
    the recipe, not of the paper.
    """

    name = "srste"
    Params = SRSTEParams
    params: SRSTEParams
    straight_through = False
    fsdp_refusal = (
        "it attaches its N:M mask parametrization to whole weights in prepare, which FSDP has sharded by then, "
        "and keeps whole masks in the run's state"
    )

    def __init__(self, params: SRSTEParams) -> None:
        super().__init__(params)
        self.pattern = NMPattern.parse(params.pattern)
        self.layers: dict[str, nn.Module] = {}
        self.teacher: nn.Module | None = None
        self._onloads = ExitStack()

    def check_layer(self, name: str, module: nn.Module) -> None:
        SparsityParams(pattern=self.params.pattern).check_width(name, module)

    def produces(self) -> Produces:
        return Produces(sparsity=str(self.pattern))

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        for name in run.targets:
            state = context.layers.get(name)
            if state is not None and (state.quant is not None or state.outliers is not None):
                raise UserError(
                    f"quantized by an earlier stage ({state.method}); srste moves the mask and would leave the "
                    "grid: put the quantizing stage after srste",
                    name,
                )
        for name, module in run.targets.items():
            attach(module, self.pattern, self.params.lambda_w)
            self.layers[name] = module
        masks = self.masks()
        context.state[STATE_KEY] = {"start": masks, "previous": masks, "curve": []}
        if self.params.loss == "forward_kl":
            teacher = self._onloads.enter_context(onloaded(context.reference_model(), device))
            self.teacher = teacher.eval().requires_grad_(False)

    def masks(self) -> dict[str, torch.Tensor]:
        """The mask each layer's next forward pass will use, from its dense weights."""
        return {name: nm_mask(dense_weight(module), self.pattern) for name, module in self.layers.items()}

    def log_values(self, context: Context, run: StageRun, step: int) -> dict[str, float]:
        state = context.state[STATE_KEY]
        masks = self.masks()
        since_start = sparse_architecture_divergence(masks, state["start"])
        since_previous = sparse_architecture_divergence(masks, state["previous"])
        state["previous"] = masks
        state["curve"].append([step, since_start, since_previous])
        return {"sad": float(f"{since_start:.4g}"), "sad_interval": float(f"{since_previous:.4g}")}

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batches["train"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.params.loss == "ce":
            return model(**inputs, labels=batch["labels"]).loss, {}
        student = model(**inputs).logits.float()
        with torch.no_grad():
            teacher = self.teacher(**inputs).logits.float()
        per_position = F.kl_div(
            student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        mask = batch["attention_mask"].to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1), {}

    def finish(self, context: Context, run: StageRun) -> None:
        self._onloads.close()
        self.teacher = None
        state = context.state.get(STATE_KEY)
        start = state["start"] if state else {}
        final = self.masks()
        for name, module in self.layers.items():
            bake(module)
            context.update_layer(name, method=self.name, sparsity=str(self.pattern))
            layer = run.record.layers.setdefault(name, {})
            layer["sparsity"] = str(self.pattern)
            if name in start:
                layer["sad"] = sparse_architecture_divergence({name: final[name]}, {name: start[name]})
        if state:
            run.record.details["sad_curve"] = state["curve"]
            run.record.details["sad"] = sparse_architecture_divergence(final, start)
            del context.state[STATE_KEY]
        self.layers = {}
