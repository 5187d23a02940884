"""The training-method contract: what a method that trains supplies to the shared loop.

A training method subclasses :class:`TrainingMethod`, sets ``Params`` to a subclass of
:class:`TrainParams` and implements ``loss``; :func:`compress.training.loop.train` does the
rest (optimizer, schedule, global batch and accumulation, devices, checkpoints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.data import Batch
from compress.errors import UserError
from compress.method import Method, MethodKind, MethodParams

if TYPE_CHECKING:
    from compress.context import Context, StageRun
    from compress.recipe import DataSpec

__all__ = ["Batch", "TrainParams", "TrainingMethod"]

DataNames = str | dict[str, str] | None


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
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="decay after warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; null for no clipping")
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
    log_every: int = Field(10, gt=0, description="steps between loss-curve points")
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations of eval_data")
    checkpoint_every: int | None = Field(
        None, gt=0, description="steps between training checkpoints (also written on Ctrl-C)"
    )

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainParams:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        return self


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
        stage's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(groups, lr=self.params.lr, weight_decay=self.params.weight_decay)

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-step and the values to log with it.

        ``batches`` holds one batch (:data:`compress.data.Batch`, on the device) of each of
        :attr:`datasets`, e.g. ``batches["train"]``: ``input_ids``, ``attention_mask`` and
        ``labels`` (-100 where the loss is masked: padding, and prompts when the data has
        ``loss_on: answers``), or ``pixel_values`` and ``labels`` for images. Return the mean
        over the micro-batch: the loop averages micro-steps and devices.
        """
        raise NotImplementedError

    def finish(self, context: Context, run: StageRun) -> None:
        """Called once after the last step (also after a failure): release what prepare took."""
