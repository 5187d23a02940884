"""``eqnet``: trains the elastic quantization supernet on the shared training loop."""

from __future__ import annotations

import io
import random
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from compress.api import Batch, CandidateOffer, Context, DataSpec, StageRun, TrainingMethod, TrainParams, UserError
from compress_eqnet.efficiency import layer_costs
from compress_eqnet.losses import soft_kl, wdr_terms
from compress_eqnet.offer import OFFER
from compress_eqnet.quantizers import BITS
from compress_eqnet.supernet import Space, Supernet, latent_weight

STATE_KEY = "eqnet"
RNG_KEY = "eqnet_sampler"
"""``context.state`` key of the sub-network sampler, so a resumed run draws what the uninterrupted one would."""
SUPERNET_FILE = "eqnet-supernet.pt"


def check_bits(values: list[int], key: str) -> list[int]:
    """``values`` when every one lies in the elastic space 2..8; ValueError naming the first that does not."""
    for bits in values:
        if bits not in BITS:
            raise ValueError(f"{key}: {bits} is outside EQ-Net's elastic space ({BITS[0]}..{BITS[-1]} bits)")
    if not values:
        raise ValueError(f"{key}: give at least one bit width")
    return sorted(set(values))


class EQNetParams(TrainParams):
    """Parameters of ``eqnet``; defaults from EQ-Net's ``configs/train-supernet.yaml``."""

    w_bits: list[int] = Field(list(BITS), description="weight bit widths of the elastic space (2..8)")
    a_bits: list[int] = Field(list(BITS), description="input (activation) bit widths of the elastic space (2..8)")
    granularity: list[Literal["channel", "tensor"]] = Field(
        ["channel", "tensor"],
        min_length=1,
        description="weight granularities of the space (one step size per row, or one)",
    )
    w_symmetric: list[bool] = Field([True, False], min_length=1, description="weight grid symmetries of the space")
    a_symmetric: list[bool] = Field([True, False], min_length=1, description="input grid symmetries of the space")
    fixed_bits: int = Field(8, ge=2, le=8, description="bits of the first and last targeted layer (weights and inputs)")
    subnets: int = Field(
        3,
        ge=1,
        description="sub-networks per step (the sandwich rule): the biggest on CE, then random ones on "
        "0.5 KL to the previous + 0.5 CE, the last the smallest; 1 trains the biggest only (static QAT "
        "when the space is one setting)",
    )
    kurtosis_weight: float = Field(0.015, ge=0, description="weight of the WDR kurtosis term")
    skewness_weight: float = Field(1.0, ge=0, description="weight of the WDR skewness term")
    kurtosis_target: float = Field(1.8, description="WDR kurtosis target (the uniform distribution's)")
    init_samples: int = Field(256, gt=0, description="training images that initialize the step sizes")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of Adam")
    max_grad_norm: float | None = Field(None, gt=0, description="clip the gradient norm (the code clips by value)")
    max_grad_value: float | None = Field(1.0, gt=0, description="clip each gradient element (the code's 1.0)")

    @field_validator("w_bits", "a_bits")
    @classmethod
    def _in_space(cls, value: list[int], info: ValidationInfo) -> list[int]:
        return check_bits(value, info.field_name)

    def space(self) -> Space:
        return Space(
            w_bits=tuple(self.w_bits),
            a_bits=tuple(self.a_bits),
            channel=tuple(dict.fromkeys(g == "channel" for g in self.granularity)),
            w_symmetric=tuple(dict.fromkeys(self.w_symmetric)),
            a_symmetric=tuple(dict.fromkeys(self.a_symmetric)),
            fixed_bits=self.fixed_bits,
        )


class EQNet(TrainingMethod):
    """EQ-Net's elastic quantization supernet (Xu et al., ICCV 2023; xuke225/EQ-Net).

    One weight-sharing network trained to work at every setting of its elastic space: weight
    and input bits 2..8 per layer, per-channel or per-tensor weight step sizes, symmetric or
    asymmetric grids; the first and last targeted layers stay at ``fixed_bits``. Every
    targeted Conv2d/Linear gets LSQ+ quantizers with a learnable step size (and offset) per
    bit width, symmetry and granularity, initialized by an L2.4 range search on
    ``init_samples`` training images. Each step (``runner/trainer.py``): the Weight
    Distribution Regularization loss (0.015 · (kurtosis − 1.8)² + 1.0 · skewness², over the
    layers but the first), then the Group Progressive Guidance sandwich: the biggest
    sub-network on cross-entropy, a random one on 0.5 · KL to the biggest's logits + 0.5 · CE,
    the smallest on 0.5 · KL to the random one's + 0.5 · CE; the gradients add up, are clipped
    by value at 1.0, and Adam takes one step (one backward of the summed losses: the same
    gradients as the code's separate backward passes). Granularity and symmetries are drawn
    per layer for every sub-network. Image classifiers only (``pixel_values``, ``labels``).

    The model keeps its full-precision (latent) weights; the learned step sizes go to the
    later ``eqnet_search`` stages (``context.state``, also across ``--resume``) and to
    ``eqnet-supernet.pt`` next to report.json, which a search recipe can start from.
    """

    name = "eqnet"
    Params = EQNetParams
    params: EQNetParams
    default_targets: ClassVar[list[str]] = ["Conv2d", "Linear"]
    default_ignore: ClassVar[list[str]] = []
    supported_modules = (nn.Conv2d, nn.Linear)
    writes_state: ClassVar[tuple[str, ...]] = (STATE_KEY,)
    straight_through: ClassVar[bool] = False  # the supernet's own quantizers replace any fixed grid
    offers: ClassVar[CandidateOffer] = OFFER
    """The supernet's sub-networks as search candidates, once this stage trained it (:mod:`compress_eqnet.offer`)."""
    keeps_zeros: ClassVar[bool] = False

    def __init__(self, params: EQNetParams) -> None:
        super().__init__(params)
        self.supernet: Supernet | None = None
        self.model: nn.Module | None = None
        self.costs: dict[str, dict[str, float]] = {}
        self.state: dict[str, Any] = {}

    def check_data(self, data: dict[str, DataSpec]) -> None:
        super().check_data(data)
        for entry in self.data_names().values():
            if data[entry].source != "images":
                raise UserError(f"eqnet trains image classifiers: data: {entry}: has source {data[entry].source!r}")

    def check_stage(self, methods: dict[str, Any], targets: dict[str, nn.Module], writer: Any) -> None:
        at_least_three(len(targets))

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        self.model = context.model
        layers = ordered_layers(context.model, run.targets)
        self.state = context.state  # the loop restores the sampler into it on --resume
        self.state[RNG_KEY] = random.Random(context.recipe.run.seed + run.index)
        supernet = Supernet(layers, self.params.space())
        samples = context.data(self.data_names()["train"])[: self.params.init_samples]
        images = torch.stack([sample["pixel_values"] for sample in samples]).to(device)
        self.costs = layer_costs(context.model, layers, images[:1])
        supernet.install()
        self.supernet = supernet
        supernet.initialize(context.model, lambda model: model(pixel_values=images))

    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[dict[str, Any]]:
        """The whole supernet trains: every model parameter (batch norms included) and the step sizes."""
        return [{"params": list(self.model.parameters())}]

    def configure_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """Adam, as the code's ``OPTIM.optimizer``."""
        return torch.optim.Adam(groups, lr=self.params.lr, weight_decay=self.params.weight_decay)

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batches["train"]
        images, labels = batch["pixel_values"], batch["labels"]
        supernet, params, rng = self.supernet, self.params, self.state[RNG_KEY]
        weights = [latent_weight(module) for module in list(supernet.layers.values())[1:]]
        kurtosis, skewness = wdr_terms(weights, params.kurtosis_target)
        supernet.set(supernet.biggest(rng))
        logits = model(pixel_values=images).logits
        biggest = F.cross_entropy(logits.float(), labels)
        total = params.kurtosis_weight * kurtosis + params.skewness_weight * skewness + biggest
        logs = {"kurtosis": kurtosis.item(), "skewness": skewness.item(), "ce_biggest": biggest.item()}
        for index in range(1, params.subnets):
            last = index == params.subnets - 1
            supernet.set(supernet.smallest(rng) if last else supernet.random(rng))
            teacher = logits.detach()
            logits = model(pixel_values=images).logits
            guided = soft_kl(logits, teacher, labels)
            total = total + guided
            logs["smallest" if last else f"random_{index}"] = guided.item()
        return total, logs

    def finish(self, context: Context, run: StageRun) -> None:
        if self.supernet is None:
            return
        state = {
            "layers": self.supernet.names,
            "space": asdict(self.supernet.space),
            "quantizers": self.supernet.state_dict(),
            "costs": self.costs,
        }
        self.supernet.remove()
        self.supernet = None
        context.state.pop(RNG_KEY, None)
        context.state[STATE_KEY] = state
        buffer = io.BytesIO()
        torch.save(state, buffer)
        context.files[SUPERNET_FILE] = buffer.getvalue()
        # the trained model, for later search stages (rco, evopress, eqnet_search) after one replaced weights
        state["latent"] = {key: value.detach().cpu().clone() for key, value in context.model.state_dict().items()}
        run.record.details["elastic_layers"] = len(state["layers"]) - 2


def ordered_layers(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``targets`` in model order; at least three (the first and last are held at fixed bits)."""
    layers = {name: module for name, module in model.named_modules() if name in targets}
    at_least_three(len(layers))
    return layers


def at_least_three(count: int) -> None:
    if count < 3:
        raise UserError(f"eqnet needs at least 3 targeted layers (the first and last stay at fixed bits), not {count}")
