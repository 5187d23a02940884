"""The training-method contract: what a method that trains supplies to the shared loop.

A training method subclasses :class:`TrainingMethod`, sets ``Params`` to a subclass of
:class:`TrainParams` and implements ``loss``; :func:`compress.training.loop.train` does the
rest (optimizer, schedule, global batch and accumulation, devices, checkpoints).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.data import Batch
from compress.errors import UserError, one_line
from compress.method import Method, MethodKind, MethodParams

if TYPE_CHECKING:
    from compress.context import Context, StageRun
    from compress.recipe import DataSpec

__all__ = ["Batch", "TrainParams", "TrainingMethod"]

DataNames = str | dict[str, str] | None
Schedule = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "polynomial",
    "inverse_sqrt",
    "warmup_stable_decay",
]
"""transformers' schedules that need no metric at each step (not reduce_lr_on_plateau, greedy)."""


class TrainParams(MethodParams):
    """Parameters every training method shares."""

    data: DataNames = Field(
        None,
        description="the recipe's data: entries to train on: one name when the method reads one dataset, else "
        "{dataset: entry} (e.g. {forget: tofu_forget, retain: tofu_retain}); unset = each dataset reads the "
        "entry of its own name (train, or e.g. forget and retain)",
    )
    eval_data: DataNames = Field(
        None, description="data: entries whose loss is reported every eval_every steps, given like data"
    )
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(
        8, gt=0, description="samples of each dataset per optimizer step, over all devices together (the global batch)"
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="samples per device per forward pass; a device's share of batch_size beyond it is gradient "
        "accumulation (batch_size / (devices x micro_batch_size) micro-steps); unset = the whole share at once",
    )
    lr: float = Field(1e-5, gt=0, description="peak learning rate (of AdamW unless the method chooses)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr over this many steps")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="warm-up over this fraction of steps (rounded up); instead of warmup_steps"
    )
    schedule: Schedule = Field(
        "cosine", description="learning-rate schedule after warm-up, transformers.get_scheduler's name"
    )
    schedule_kwargs: dict[str, float | int] = Field(
        {},
        description="the schedule's own parameters (get_scheduler's scheduler_specific_kwargs), e.g. "
        "{min_lr_rate: 0.1} for cosine_with_min_lr, {num_cycles: 2} for cosine_with_restarts",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; null for no clipping")
    max_grad_value: float | None = Field(
        None, gt=0, description="clip each gradient element to [-value, value] (before max_grad_norm); null: no"
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto",
        description="bf16 autocast over fp32 master weights; auto = bf16 on a GPU or for a bf16/fp16 model, else no",
    )
    latent_weights: Literal["compressed", "original"] = Field(
        "compressed",
        description="where the full-precision weights behind quantized layers start: the compressed "
        "weights (keeps what e.g. GPTQ chose) or the original model's (same forward pass at step 0 "
        "for round-to-nearest grids, and the detail below the grid step is kept)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    compile: bool = Field(
        False,
        description="torch.compile the trained model's forward (and backward): far fewer kernel launches and "
        "Python per step where small batches leave the GPU waiting on the host, which every data-parallel "
        "process repeats; costs a compilation (minutes) at the first step and at the first evaluation",
    )
    log_every: int = Field(10, gt=0, description="steps between loss-curve points")
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations of eval_data")
    checkpoint_every: int | None = Field(
        None, gt=0, description="steps between training checkpoints (also written on Ctrl-C)"
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        [],
        description="experiment trackers (accelerate's) that get loss, lr, tokens_per_second and eval_loss at each "
        "log point: tensorboard, wandb or both; wandb follows WANDB_MODE (offline) and its other variables",
    )
    logging_dir: Path | None = Field(
        None, description="where the trackers write; default: runs/ next to the output directory"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        from compress.training.trackers import missing_tracker

        refusal = missing_tracker(value)
        if refusal:
            raise ValueError(refusal)
        return value

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainParams:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        return self

    @model_validator(mode="after")
    def _schedule_builds(self) -> TrainParams:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.schedule == "constant" and self.warmup:
            raise ValueError("schedule constant has no warm-up: use constant_with_warmup")
        try:  # transformers checks the schedule's own parameters when it builds one
            self.scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
        except (TypeError, ValueError) as error:
            raise ValueError(f"schedule {self.schedule}: {one_line(str(error))}") from None
        return self

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps``, or ``warmup_ratio`` of ``steps`` rounded up (as transformers' Trainer)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.steps)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule over ``steps`` optimizer steps, from ``transformers.get_scheduler``.

        It is a ``LambdaLR`` whose state (the step) checkpoints save; a resumed run with more
        ``steps`` builds it over the new total and continues at the saved step.
        """
        from transformers import get_scheduler

        return get_scheduler(
            self.schedule,
            optimizer,
            num_warmup_steps=self.warmup,
            num_training_steps=self.steps,
            scheduler_specific_kwargs=self.schedule_kwargs,
        )


class TrainingMethod(Method):
    """A method that trains: it supplies the loss, the shared loop does the training.

    Subclasses set ``Params`` to a subclass of :class:`TrainParams` and implement
    :meth:`loss`; :meth:`prepare` and :meth:`finish` bracket the loop (load a teacher,
    move it to the device and back).
    """

    kind: ClassVar[MethodKind] = "training"
    Params: ClassVar[type[TrainParams]] = TrainParams
    params: TrainParams
    datasets: ClassVar[tuple[str, ...]] = ("train",)
    """The datasets the loss reads at every step (e.g. ``("forget", "retain")``); ``loss`` gets
    one batch of each, keyed by these names, and the recipe maps them to ``data:`` entries
    through the ``data`` parameter."""
    straight_through: ClassVar[bool] = True
    """Train layers an earlier stage quantized or pruned through their fixed grids and masks
    (:mod:`compress.straight_through`). A method that moves masks or grids itself (SR-STE)
    sets it to False and keeps ``context.layers`` true on its own."""
    keeps_zeros: ClassVar[bool] = True  # the straight-through estimator keeps an earlier stage's masks
    fsdp_refusal: ClassVar[str] = ""
    """Why the method cannot train a model sharded by FSDP (``accelerate launch --use_fsdp``), e.g.
    because its loss reads whole weights; empty when it can. ``compress recipe check`` refuses
    such a stage under FSDP with this reason."""

    def data_names(self) -> dict[str, str]:
        """The ``data:`` entry each of :attr:`datasets` reads (UserError when ``data`` does not fit them)."""
        return self._resolve("data", self.params.data)

    def eval_names(self) -> dict[str, str]:
        """The ``data:`` entry evaluated in place of each of :attr:`datasets`; empty when ``eval_data`` is unset."""
        return {} if self.params.eval_data is None else self._resolve("eval_data", self.params.eval_data)

    def _resolve(self, key: str, names: str | dict[str, str] | None) -> dict[str, str]:
        if names is None:
            return {name: name for name in self.datasets}
        if isinstance(names, str):
            if len(self.datasets) > 1:
                raise UserError(
                    f"{key}: names one entry, but method {self.name!r} reads {len(self.datasets)} datasets: "
                    f"give {{{', '.join(f'{name}: ENTRY' for name in self.datasets)}}}"
                )
            return {self.datasets[0]: names}
        for name in names:
            if name not in self.datasets:
                raise UserError(
                    f"{key}: has {name!r}, which method {self.name!r} does not read "
                    f"(it reads {', '.join(self.datasets)})"
                )
        missing = [name for name in self.datasets if name not in names]
        if missing:
            raise UserError(f"{key}: lacks dataset {missing[0]!r} of method {self.name!r}")
        return dict(names)

    def check_data(self, data: dict[str, DataSpec]) -> None:
        super().check_data(data)
        for names in (self.data_names(), self.eval_names()):
            for dataset, entry in names.items():
                if entry not in data:
                    role = "" if entry == dataset else f" (as {dataset})"
                    raise UserError(f"method {self.name!r} reads data: {entry}:{role}, which the recipe lacks")
        for entry in self.data_names().values():
            if data[entry].samples < self.params.batch_size:
                raise UserError(
                    f"training data {entry!r} has {data[entry].samples} samples, "
                    f"fewer than one batch (batch_size {self.params.batch_size})"
                )
        if not self.straight_through and self.params.latent_weights == "original":
            raise UserError(
                f"latent_weights: original needs the host's straight-through, which method {self.name!r} does not use"
            )

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        """Called once before the first step, with the model already on ``device``."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not the model's (e.g. hidden-state projections), created in
        :meth:`prepare`; checkpoints hold them and ``--resume`` restores them."""
        return []

    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, in torch's form (``{"params": [...], "lr": ..., ...}``).

        :param trainable: the targeted layers' parameters (weights behind a straight-through
            grid included). A group without ``lr`` or ``weight_decay`` takes the stage's;
            the schedule scales every group's ``lr``. Model parameters left out of every
            group are frozen. The default: one group of ``trainable`` and
            :meth:`extra_parameters`.
        """
        return [{"params": [*trainable, *self.extra_parameters()]}]

    def configure_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (:meth:`parameter_groups`). The default: AdamW at the
        stage's ``lr`` and ``weight_decay``, fused (:func:`fused_optimizer_ok`) where it can be."""
        fused = fused_optimizer_ok([p for group in groups for p in group["params"]])
        return torch.optim.AdamW(groups, lr=self.params.lr, weight_decay=self.params.weight_decay, fused=fused or None)

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss of one micro-step and the values to log with it (floats, or 0-d tensors
        left on the device: the loop reads them back only at log points).

        ``batches`` holds one batch (:data:`compress.data.Batch`, on the device) of each of
        :attr:`datasets`, e.g. ``batches["train"]``: ``input_ids``, ``attention_mask`` and
        ``labels`` (-100 where the loss is masked: padding, and prompts when the data has
        ``loss_on: answers``), or ``pixel_values`` and ``labels`` for images. Return the mean
        over the micro-batch: the loop averages micro-steps and devices.
        """
        raise NotImplementedError

    def log_values(self, context: Context, run: StageRun, step: int) -> dict[str, float]:
        """Values shown beside the loss at each log point (every ``log_every`` steps and the
        last), computed after that optimizer step on every process (e.g. SR-STE's mask
        divergence); keep in ``context.state`` what a resumed run needs to continue them.
        The default: none."""
        return {}

    def finish(self, context: Context, run: StageRun) -> None:
        """Called once after the last step (also after a failure): release what prepare took."""


def fused_optimizer_ok(parameters: list[nn.Parameter]) -> bool:
    """Whether torch's fused optimizer kernels take ``parameters``: all floating point, plain
    (not sharded DTensor) and on CUDA. One fused AdamW step is a few kernel launches where the
    per-tensor loop is several per parameter: the training step is launch-bound at small
    batches, and every data-parallel process repeats those launches."""
    return bool(parameters) and all(
        p.device.type == "cuda" and p.dtype.is_floating_point and type(p.data) is torch.Tensor for p in parameters
    )
