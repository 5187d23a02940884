from __future__ import annotations

import inspect
from contextlib import ExitStack
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from compress.api import Batch, Context, ModelSpec, StageRun, TrainingMethod, TrainParams, UserError, frozen_placed
from compress_distill.losses import LOSSES, HiddenProjection, LossSpec, layer_map, lookup_loss, top_k_logits


class LossTerm(BaseModel):
    """One weighted term of the distillation objective; other keys are the loss's own parameters."""

    model_config = ConfigDict(extra="allow")

    loss: str = Field(description="a loss of `compress methods distill`'s table, or ce (cross-entropy on the data)")
    weight: float = Field(1.0, ge=0)
    temperature: float | None = Field(None, gt=0, description="overrides the stage's temperature")
    layers: dict[int, int] | None = Field(
        None, description="hidden-state losses: student layer -> teacher layer (hidden_states index, 0 = embeddings)"
    )

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def spec(self) -> LossSpec | None:
        return None if self.loss == "ce" else LOSSES[self.loss]

    @model_validator(mode="after")
    def _known(self) -> LossTerm:
        if self.loss == "ce":
            allowed: tuple[str, ...] = ()
        else:
            try:
                spec = lookup_loss(self.loss)
            except UserError as error:
                raise ValueError(error.message) from None
            if spec.inputs == "aux_logits":
                raise ValueError(
                    f"{self.loss!r} trains an auxiliary classifier head (see scripts/bench_distill_cifar.py); "
                    "a distill stage compares the model's own outputs"
                )
            if self.layers is not None and spec.inputs != "hidden":
                raise ValueError(f"layers applies to hidden-state losses, not {self.loss!r}")
            allowed = spec.params
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"loss {self.loss!r} has no parameter {unknown[0]!r} (it takes: {', '.join(allowed) or 'none'})"
            )
        return self


class DistillParams(TrainParams):
    teacher: ModelSpec | None = Field(
        None, description="the teacher checkpoint; unset = the run's original, uncompressed model"
    )
    losses: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(loss="forward_kl")], min_length=1, description="weighted loss terms, summed"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of every logit loss")
    top_k: int | None = Field(
        None, gt=0, description="keep only the teacher's top-k logits per position (sparse teacher)"
    )

    @field_validator("teacher", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class Distill(TrainingMethod):
    """Knowledge distillation of the (compressed) model from a teacher, on logits and hidden states.

    The student is the run's model as the earlier stages left it; layers they quantized or
    pruned train through their grids and masks (straight-through), so the result is written
    in the same format. The teacher is the original model (recovery after compression) or
    another checkpoint (``teacher:``) sharing the student's vocabulary.

    Each term of ``losses`` compares the student's and the teacher's next-token
    distributions at every non-padding position (or their hidden states), at
    ``temperature``; the terms are weighted and summed. ``ce`` is the cross-entropy on the
    data itself. The logit losses and their papers are listed below.
    """

    name = "distill"
    Params = DistillParams
    params: DistillParams

    def __init__(self, params: DistillParams) -> None:
        super().__init__(params)
        self.teacher: nn.Module | None = None
        self.projections = nn.ModuleDict()
        self._onloads = ExitStack()

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        teacher = context.reference_model() if self.params.teacher is None else context.load_model(self.params.teacher)
        if not all(self._is_hidden(term) for term in self.params.losses):
            check_same_vocabulary(context.model, teacher)
        placed = self._onloads.enter_context(frozen_placed(teacher, device))
        self.teacher = torch.compile(placed) if self.params.compile else placed
        for term in self.params.losses:
            if self._is_hidden(term):
                for student_layer in self._layer_map(term, context.model, teacher):
                    key = str(student_layer)
                    if key not in self.projections:
                        self.projections[key] = HiddenProjection(
                            context.model.config.hidden_size, teacher.config.hidden_size
                        )
        self.projections.to(device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def finish(self, context: Context, run: StageRun) -> None:
        self._onloads.close()
        self.teacher = None

    @staticmethod
    def _is_hidden(term: LossTerm) -> bool:
        return term.spec is not None and term.spec.inputs == "hidden"

    @staticmethod
    def _layer_map(term: LossTerm, student: nn.Module, teacher: nn.Module) -> dict[int, int]:
        if term.layers is not None:
            return term.layers
        return layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = batches["train"]
        hidden = any(self._is_hidden(term) for term in self.params.losses)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student = model(**inputs, output_hidden_states=hidden)
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=hidden)
        mask = batch["attention_mask"].bool()
        student_logits = student.logits.float()  # once for every term
        teacher_logits = teacher.logits.float()
        if self.params.top_k is not None:
            teacher_logits = top_k_logits(teacher_logits, self.params.top_k)
        total = student_logits.new_zeros(())
        logs = {}
        for term in self.params.losses:
            spec = term.spec
            if spec is None:
                value = causal_cross_entropy(student_logits, batch["labels"])
            elif spec.inputs == "hidden":
                value = self._hidden_loss(term, spec, student.hidden_states, teacher.hidden_states, mask, model)
            else:
                options = dict(term.options, temperature=term.temperature or self.params.temperature)
                if spec.uses_labels:
                    # position t predicts token t+1; the last position has no label
                    value = spec.function(
                        student_logits[:, :-1],
                        teacher_logits[:, :-1],
                        mask=mask[:, :-1],
                        labels=batch["labels"][:, 1:],
                        **options,
                    )
                else:
                    value = spec.function(student_logits, teacher_logits, mask=mask, **options)
            total = total + term.weight * value
            logs[term.loss] = value.detach()
        return total, logs if len(logs) > 1 else {}

    def _hidden_loss(
        self, term: LossTerm, spec: LossSpec, student: tuple, teacher: tuple, mask: torch.Tensor, model: nn.Module
    ) -> torch.Tensor:
        layers = self._layer_map(term, _unwrap(model), self.teacher)
        values = [spec.function(self.projections[str(s)](student[s]), teacher[t], mask=mask) for s, t in layers.items()]
        return torch.stack(values).mean()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def causal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of float32 ``logits``; labels of -100 are skipped."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    """Logit losses compare distributions over one vocabulary; refuse two different ones."""
    ours = student.get_output_embeddings().weight.shape[0]
    theirs = teacher.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise UserError(
            f"the teacher's vocabulary has {theirs} tokens and the student's {ours}; "
            "logit distillation needs one tokenizer for both (use hidden-state losses only, or a teacher of the same family)",
            "stage distill: teacher",
        )


def describe_losses() -> str:
    """The loss table of ``compress methods distill``."""
    lines = ["", "Losses (``losses: [{loss: NAME, weight: W, PARAM: VALUE}]``):", ""]
    lines.append("- ce: cross-entropy of the student on the data itself")
    for spec in LOSSES.values():
        if spec.inputs == "aux_logits":
            continue
        params = f" Parameters: {', '.join(spec.params)}." if spec.params else ""
        lines.append(f"- {spec.name}: {spec.summary} ({spec.paper}).{params}")
    return "\n".join(lines)


Distill.__doc__ = inspect.cleandoc(Distill.__doc__ or "") + "\n" + describe_losses()
