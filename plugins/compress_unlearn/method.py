"""The unlearning methods on the shared training loop: ga, graddiff, npo, simnpo, dipo.

Each reads two datasets, ``forget`` and ``retain`` (the recipe's ``data:`` entries of those
names, or others through ``data: {forget: ..., retain: ...}``), one batch of each per
step, and minimizes γ·L_forget + α·L_retain as open-unlearning's trainers do
(``src/trainer/unlearn/``). The defaults are open-unlearning's TOFU configurations
(``configs/trainer/*.yaml``), except the learning rate and step count, which are the
loop's own.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.api import (
    IGNORE_INDEX,
    Batch,
    Context,
    DataSpec,
    ModelSpec,
    StageRun,
    TrainingMethod,
    TrainParams,
    UserError,
    onloaded,
)
from compress_unlearn.data import overlapping_items
from compress_unlearn.losses import (
    dipo_loss,
    gradient_ascent_loss,
    mean_nll,
    npo_loss,
    retain_kl,
    simnpo_loss,
)


class UnlearnParams(TrainParams):
    gamma: float = Field(1.0, ge=0, description="weight γ of the forget term")


class RetainParams(UnlearnParams):
    alpha: float = Field(1.0, ge=0, description="weight α of the retain term")
    retain_loss: Literal["nll", "kl"] = Field(
        "nll", description="retain term: nll (descent on the retain answers) or kl (KL(reference || model) on them)"
    )
    reference: ModelSpec | None = Field(
        None,
        description="the frozen reference model (NPO's π_ref, the KL retain term's target); unset = the run's "
        "original model (the model to unlearn, as open-unlearning does); same vocabulary as the model",
    )

    @field_validator("reference", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class Unlearn(TrainingMethod):
    """The shared part of the unlearning methods: the two datasets, their check, the reference."""

    datasets: ClassVar[tuple[str, ...]] = ("forget", "retain")
    Params: ClassVar[type[TrainParams]] = UnlearnParams
    # any module's own parameters train, so a recipe can reach fused MoE experts and routers
    supported_modules: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)

    def __init__(self, params: TrainParams) -> None:
        super().__init__(params)
        self.reference: nn.Module | None = None
        self._onloads = ExitStack()

    def check_data(self, data: dict[str, DataSpec]) -> None:
        super().check_data(data)
        names = self.data_names()
        shared, first = overlapping_items(data[names["forget"]], data[names["retain"]])
        if shared:
            raise UserError(
                f"the forget and retain sets share {shared} item(s) (first: {first}); an item cannot be both "
                "forgotten and kept",
                "data",
            )

    def needs_reference(self) -> bool:
        """Whether the loss reads the frozen reference model (loaded in :meth:`prepare`)."""
        return False

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        if not self.needs_reference():
            return
        spec = getattr(self.params, "reference", None)
        reference = context.reference_model() if spec is None else context.load_model(spec)
        check_same_vocabulary(context.model, reference, self.name)
        self.reference = self._onloads.enter_context(onloaded(reference, device)).eval().requires_grad_(False)

    def finish(self, context: Context, run: StageRun) -> None:
        self._onloads.close()
        self.reference = None

    def reference_logits(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(self.reference, batch)

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        raise NotImplementedError

    def retain_loss(self, model: nn.Module, retain: Batch) -> torch.Tensor | None:
        return None

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        batches = {name: as_sequences(batch) for name, batch in batches.items()}
        forget = self.forget_loss(model, batches["forget"])
        retain = self.retain_loss(model, batches["retain"])
        total = self.params.gamma * forget
        logs = {"forget": forget.item()}
        if retain is not None:
            total = total + self.params.alpha * retain
            logs["retain"] = retain.item()
        return total, logs


def as_sequences(batch: Batch) -> Batch:
    """An image classifier's batch as one-token sequences: labels ``[B]`` become ``[[-100, y]]``, so the
    sequence losses score the class at the one predicting position (:func:`logits_of`) and every
    method applies to classifiers unchanged (GA: −cross-entropy; NPO: the label's log-probability)."""
    if "pixel_values" not in batch:
        return batch
    labels = batch["labels"].view(-1, 1)
    return {**batch, "labels": torch.cat([torch.full_like(labels, IGNORE_INDEX), labels], dim=1)}


def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Causal-LM logits ``[B, T, V]``; a classifier's ``[B, C]`` as ``[B, 2, C]``, position 0 predicting the class."""
    if "pixel_values" in batch:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return torch.stack([logits, torch.zeros_like(logits)], dim=1)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def output_width(model: nn.Module) -> int:
    """The vocabulary of a language model, the classes of a classifier."""
    embeddings = model.get_output_embeddings()
    return model.config.num_labels if embeddings is None else embeddings.weight.shape[0]


def check_same_vocabulary(model: nn.Module, reference: nn.Module, method: str) -> None:
    """Log-ratios and KL compare distributions over one vocabulary; refuse two different ones."""
    ours, theirs = output_width(model), output_width(reference)
    if ours != theirs:
        raise UserError(
            f"the reference model's vocabulary has {theirs} tokens and the model's {ours}; the reference must "
            "share the model's tokenizer (unset it to use the original model)",
            f"stage {method}: reference",
        )


class GradientAscent(Unlearn):
    """Gradient ascent on the forget set: minimizes γ·(−NLL) of the forget answers (open-unlearning's
    ``GradAscent``, token-mean NLL). It has no retain term; ``retain`` is still required, so
    that every unlearning recipe names the kept data and is refused when the two overlap."""

    name = "ga"

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        return gradient_ascent_loss(logits_of(model, forget), forget["labels"])


class GradDiff(Unlearn):
    """Gradient difference: γ·(−NLL on forget) + α·(NLL on retain, or KL(reference ‖ model) on
    retain with ``retain_loss: kl``), as open-unlearning's ``GradDiff`` (defaults γ = α = 1, nll)."""

    name = "graddiff"
    Params = RetainParams
    params: RetainParams

    def needs_reference(self) -> bool:
        return self.params.retain_loss == "kl"

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        return gradient_ascent_loss(logits_of(model, forget), forget["labels"])

    def retain_loss(self, model: nn.Module, retain: Batch) -> torch.Tensor:
        logits = logits_of(model, retain)
        if self.params.retain_loss == "nll":
            return mean_nll(logits, retain["labels"])
        return retain_kl(logits, self.reference_logits(retain), retain["attention_mask"])


class NPOParams(RetainParams):
    beta: float = Field(0.1, gt=0, le=100, description="inverse temperature β of the NPO loss")


class NPO(GradDiff):
    """Negative Preference Optimization (Zhang, Lin, Bai, Mei 2024, arXiv 2404.05868):
    γ·(−(2/β)·mean log σ(β·(ℓ_θ − ℓ_ref))) + α·retain term, ℓ the summed NLL of each forget
    answer, π_ref the frozen reference (the original model). Defaults β = 0.1, α = γ = 1 as
    open-unlearning's ``NPO`` and the authors' TOFU configuration (``npo_grad_diff``)."""

    name = "npo"
    Params = NPOParams
    params: NPOParams

    def needs_reference(self) -> bool:
        return True

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        return npo_loss(logits_of(model, forget), self.reference_logits(forget), forget["labels"], self.params.beta)


class SimNPOParams(RetainParams):
    beta: float = Field(4.5, gt=0, le=100, description="inverse temperature β")
    delta: float = Field(
        0.0, ge=0, le=100, description="margin δ subtracted from the per-token NLL (the code's; the paper's γ is β·δ)"
    )
    gamma: float = Field(0.125, ge=0, description="weight γ of the forget term")


class SimNPO(GradDiff):
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), reference-free and length-normalized:
    γ·(−(2/β)·mean log σ(β·(ℓ_θ/|y| − δ))) + α·retain term. Defaults β = 4.5, δ = 0,
    γ = 0.125, α = 1: the authors' TOFU forget10 setting, as open-unlearning's ``SimNPO``."""

    name = "simnpo"
    Params = SimNPOParams
    params: SimNPOParams

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        return simnpo_loss(logits_of(model, forget), forget["labels"], self.params.beta, self.params.delta)


class DiPOParams(RetainParams):
    beta: float = Field(0.1, gt=0, le=100, description="β of the token-level Bradley–Terry loss (TDPO's default)")
    kl_weight: float = Field(
        0.5, ge=0, description="α of TDPO2's sequential KL term (TDPO's default 0.5); our reconstruction"
    )
    top_k: int = Field(5, gt=0, description="high-confidence logits per position that the pair changes (our choice)")
    strength: float = Field(
        5.0, gt=0, le=100, description="how far those logits are lowered or raised, in logits (our choice)"
    )


class DiPO(GradDiff):
    """Distribution Preference Optimization (Qin et al. 2025, arXiv 2510.04773), reconstructed:
    γ·L_DiPO + α·retain term. At each forget-answer position a preferred (forgetting) and a
    dispreferred (memorizing) next-token distribution come from the reference's logits, its
    ``top_k`` largest lowered or raised by ``strength``; a TDPO-style Bradley–Terry loss with
    a sequential KL term prefers the first. The paper's full text and code were not available:
    :func:`compress_unlearn.losses.dipo_loss` lists which details are ours (all of ``top_k``,
    ``strength``, the reward in expectation, the KL form, the defaults)."""

    name = "dipo"
    Params = DiPOParams
    params: DiPOParams

    def needs_reference(self) -> bool:
        return True

    def forget_loss(self, model: nn.Module, forget: Batch) -> torch.Tensor:
        logits = logits_of(model, forget)
        if self.params.top_k >= logits.shape[-1]:
            raise UserError(f"top_k {self.params.top_k} is not below the vocabulary ({logits.shape[-1]})", "top_k")
        return dipo_loss(
            logits,
            self.reference_logits(forget),
            forget["labels"],
            self.params.beta,
            self.params.kl_weight,
            self.params.top_k,
            self.params.strength,
        )


METHODS: tuple[type[Unlearn], ...] = (GradientAscent, GradDiff, NPO, SimNPO, DiPO)
