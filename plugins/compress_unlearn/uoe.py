"""UOE: unlearning one expert of a mixture-of-experts model (Zhuang et al., arXiv 2411.18797;
ACL 2025 as "SEUF"; code zhmzm/SEUF).

What is from where:

- **Attribution** (paper, §"expert attribution"): on the forget set, expert i of layer l
  scores s_i^(l) = (1/Z)·Σ_j (1/L_j)·Σ_t g_{i,t}^(l), the router's softmax gate averaged over
  each sequence's tokens, then over sequences; the top-1 (layer, expert) over all targeted
  layers is unlearned (one expert, the paper's best setting). The authors' attribution
  script is not public (their configs hard-code layer 4 expert 5 for Qwen1.5-MoE and layer
  16 expert 20 for DeepSeek-V2-Lite); ``layer`` and ``expert`` give a target the same way.
  Padding is left out of the averages (our choice; the code packs sequences).
- **What trains** (code, ``expert_setting.set_model_param``): the chosen expert's weights
  and the router weight of its layer; nothing else. Here the expert is a slice of the fused
  ``gate_up_proj``/``down_proj`` (:func:`compress.api.trainable_slice`), so the other
  experts, and the router outside the anchor's layer, stay bit for bit.
- **Anchor loss** (code, ``ga_expert/trainer.py``): a hook on that layer's router recomputes
  g = softmax(W·h) in float32 and adds ``anchor_weight``·MSE(g, one-hot(expert)) averaged
  over tokens × experts (``chosen_gating_loss``, 1.0 in their configs) to the unlearning
  loss, so that the forget tokens keep going to the expert being unlearned. We take it on
  the forget batch only (the code's GA has no other batch; a retain batch pulled to the
  unlearned expert would defeat the retain term).
- **The unlearning loss** is the ``loss`` named (ga, graddiff, npo, simnpo, dipo) from
  :mod:`compress_unlearn.method`, with its own defaults and parameters (the paper composes
  UOE with GA, GDiff, NPO and RMU).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.api import Batch, Context, DataSpec, StageRun, TrainingMethod, UserError, collate, trainable_slice
from compress_unlearn.experts import expert_slices, experts_count, gate_probabilities, router_of
from compress_unlearn.method import NPO, DiPO, GradDiff, GradientAscent, RetainParams, SimNPO, Unlearn

LOSSES: dict[str, type[Unlearn]] = {method.name: method for method in (GradientAscent, GradDiff, NPO, SimNPO, DiPO)}
LOSS_FIELDS = ("gamma", "alpha", "retain_loss", "reference", "beta", "delta", "kl_weight", "top_k", "strength")
"""Fields that belong to the composed loss; set ones are handed to it, and refused when it lacks them."""


class UOEParams(RetainParams):
    loss: Literal["ga", "graddiff", "npo", "simnpo", "dipo"] = Field(
        "ga", description="the unlearning loss on the chosen expert (the paper's main runs: ga)"
    )
    beta: float | None = Field(None, description="the loss's β (npo, simnpo, dipo); unset = its default")
    delta: float | None = Field(None, description="simnpo's margin δ; unset = its default")
    kl_weight: float | None = Field(None, description="dipo's KL weight; unset = its default")
    top_k: int | None = Field(None, description="dipo's top_k; unset = its default")
    strength: float | None = Field(None, description="dipo's strength; unset = its default")
    anchor_weight: float = Field(
        1.0, ge=0, description="weight of the router anchor loss (SEUF's chosen_gating_loss, 1.0 in its configs)"
    )
    layer: str | None = Field(
        None, description="the MoE layer to unlearn in (e.g. model.layers.4.mlp); unset = attribution picks it"
    )
    expert: int | None = Field(None, ge=0, description="the expert to unlearn in layer; set with layer")
    attribution_samples: int | None = Field(
        None, gt=0, description="forget samples scored for attribution; unset = all (the paper: about 100K tokens)"
    )
    attribution_batch_size: int = Field(8, gt=0, description="samples per forward pass while scoring")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (SEUF's configs: 2e-4)")

    @model_validator(mode="after")
    def _layer_with_expert(self) -> UOEParams:
        if (self.layer is None) != (self.expert is None):
            raise ValueError("give layer and expert together (or neither, to attribute)")
        loss_params(self)
        return self


def loss_params(params: UOEParams) -> RetainParams:
    """The composed loss's parameters: the loop's fields and the loss fields the recipe set."""
    method = LOSSES[params.loss]
    fields = method.Params.model_fields
    chosen = {}
    for name in params.model_fields_set:
        if name in fields:
            chosen[name] = getattr(params, name)
        elif name in LOSS_FIELDS:
            raise ValueError(f"{name} is not a parameter of loss {params.loss}")
    return method.Params(**chosen)


class RouterAnchor:
    """SEUF's anchor: MSE between the router's gate on the forget tokens and one-hot(expert).

    :meth:`arm` with the forget batch's attention mask before the loss runs; the router's
    next forward (the forget batch's, which every unlearning loss computes first) is scored
    and the hook disarms, so the retain batch and recomputed forwards are not.
    """

    def __init__(self, router: nn.Module, expert: int) -> None:
        self.expert = expert
        self.mask: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.handle = router.register_forward_pre_hook(self._hook)

    def arm(self, attention_mask: torch.Tensor) -> None:
        self.mask, self.value = attention_mask.reshape(-1).bool(), None

    def _hook(self, router: nn.Module, args: tuple[Any, ...]) -> None:
        if self.mask is None:
            return
        probs = gate_probabilities(router, args[0])
        if probs.shape[0] != self.mask.numel():
            raise RuntimeError(f"router saw {probs.shape[0]} tokens, the forget batch has {self.mask.numel()}")
        probs = probs[self.mask]
        self.value = F.mse_loss(
            probs, F.one_hot(torch.full_like(probs[:, 0], self.expert).long(), probs.shape[1]).float()
        )
        self.mask = None

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the forget batch's forward did not pass the anchored router")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def affinity_scores(model: nn.Module, blocks: dict[str, nn.Module], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Per MoE layer, each expert's mean gate probability on the forget set: per sequence over
    its real tokens, then over sequences (the paper's s_i^(l))."""
    sums = {name: torch.zeros(experts_count(block), dtype=torch.float64) for name, block in blocks.items()}
    sequences = 0
    state: dict[str, torch.Tensor] = {}

    def scorer(name: str):
        def hook(router: nn.Module, args: tuple[Any, ...]) -> None:
            mask = state["mask"]
            probs = gate_probabilities(router, args[0]).reshape(*mask.shape, -1) * mask[..., None]
            per_sequence = probs.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            sums[name] += per_sequence.sum(0).double().cpu()

        return hook

    handles = [router_of(block).register_forward_pre_hook(scorer(name)) for name, block in blocks.items()]
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"].float()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            sequences += batch["input_ids"].shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(sequences, 1) for name, total in sums.items()}


def moe_layers(targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The targets that are mixture-of-experts layers (a model may mix them with dense MLPs)."""
    return {name: module for name, module in targets.items() if router_of(module) is not None}


class UOE(TrainingMethod):
    """UOE / SEUF (arXiv 2411.18797): unlearn one expert of a mixture-of-experts model.

    Attribution picks the (layer, expert) the router sends the forget set to most (its mean
    softmax gate; or ``layer``/``expert`` name it), then only that expert's weights and its
    layer's router train, on the ``loss`` named (ga, graddiff, npo, simnpo, dipo, with their
    parameters) plus ``anchor_weight``·MSE(gate, one-hot(expert)) on the forget tokens, which
    keeps them routed to it. Other experts, a fused expert tensor's other slices included,
    and every other weight stay bit for bit. Targets are the MoE layers attribution chooses
    among (default: every ``mlp``; dense ones are skipped); a stage with no MoE layer (a
    dense model) is refused: no router.
    """

    name = "uoe"
    Params = UOEParams
    params: UOEParams
    datasets: ClassVar[tuple[str, ...]] = ("forget", "retain")
    default_targets: ClassVar[list[str]] = [r"re:.*\.mlp$"]
    fsdp_refusal: ClassVar[str] = (
        "it trains slices of fused expert parameters through a parametrization over the whole parameter, "
        "which FSDP holds as shards"
    )
    supported_modules: ClassVar[tuple[type[nn.Module], ...]] = (nn.Module,)

    def __init__(self, params: UOEParams) -> None:
        super().__init__(params)
        self.inner = LOSSES[params.loss](loss_params(params))
        self.parts: list[nn.Parameter] = []
        self.anchor: RouterAnchor | None = None
        self._held = ExitStack()

    def check_stage(self, methods: dict[str, type], targets: dict[str, nn.Module], writer: Any) -> None:
        moe = moe_layers(targets)
        if not moe:
            first = next(iter(targets))
            raise UserError(
                f"no router: uoe unlearns one expert of a mixture-of-experts layer and {type(targets[first]).__name__} "
                "has none (a dense model?)",
                first,
            )
        for name, block in moe.items():
            if not expert_slices(block, 0):
                raise UserError(f"{type(block).__name__} has a router but no per-expert weights uoe can find", name)
        layer, expert = self.params.layer, self.params.expert
        if layer is None:
            return
        if layer not in moe:
            raise UserError(f"layer {layer!r} is not one of the stage's MoE targets", "layer")
        if expert >= experts_count(moe[layer]):
            raise UserError(f"expert {expert} is out of range: {layer} has {experts_count(moe[layer])}", "expert")

    def check_data(self, data: dict[str, DataSpec]) -> None:
        self.inner.check_data(data)

    def choose(self, context: Context, run: StageRun, device: torch.device) -> tuple[str, int, dict[str, list]]:
        """The (layer, expert) to unlearn and the affinity scores that chose it."""
        if self.params.layer is not None:
            return self.params.layer, self.params.expert, {}
        samples = context.data(self.data_names()["forget"])[: self.params.attribution_samples]
        pad_id = getattr(context.tokenizer, "pad_token_id", None) or 0
        size = self.params.attribution_batch_size
        batches = [
            {key: value.to(device) for key, value in collate(samples[i : i + size], pad_id).items()}
            for i in range(0, len(samples), size)
        ]
        scores = affinity_scores(context.model, moe_layers(run.targets), batches)
        layer = max(scores, key=lambda name: scores[name].max().item())
        return layer, int(scores[layer].argmax()), {name: value.tolist() for name, value in scores.items()}

    def prepare(self, context: Context, run: StageRun, device: torch.device) -> None:
        layer, expert, scores = self.choose(context, run, device)
        block = run.targets[layer]
        total = sum(p.numel() for p in context.model.parameters())
        slices = [*expert_slices(block, expert), (router_of(block), "weight", None)]
        self.parts = [self._held.enter_context(trainable_slice(*where)) for where in slices]
        self.anchor = RouterAnchor(router_of(block), expert)
        self._held.callback(self.anchor.remove)
        self.inner.prepare(context, run, device)
        trained = sum(p.numel() for p in self.parts)
        run.record.details["uoe"] = {
            "layer": layer,
            "expert": expert,
            "affinity": scores,
            "trained_parameters": trained,
            "trained_fraction": trained / total,
        }

    def parameter_groups(self, trainable: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": self.parts}]

    def loss(self, model: nn.Module, batches: dict[str, Batch]) -> tuple[torch.Tensor, dict[str, float]]:
        self.anchor.arm(batches["forget"]["attention_mask"])
        total, logs = self.inner.loss(model, batches)
        anchor = self.anchor.take()
        return total + self.params.anchor_weight * anchor, {**logs, "anchor": anchor.item()}

    def finish(self, context: Context, run: StageRun) -> None:
        self.inner.finish(context, run)
        self._held.close()
        self.parts, self.anchor = [], None
