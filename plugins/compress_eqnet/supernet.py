"""The elastic quantization supernet: LSQ+ quantizers on every targeted layer, and its sub-networks.

As ``QATQuantSuperModel`` of EQ-Net's ``module/qat_model.py``: each targeted Conv2d/Linear
gets a weight quantizer (here a ``torch.nn.utils.parametrize`` parametrization of its
``weight``) and an input quantizer (here a submodule called from a forward pre-hook); a
sub-network is one setting per layer. The first and the last targeted layer (model order)
are held at ``fixed_bits`` for weights and inputs, as in the paper. Installing and removing
leave the layer's own ``weight`` Parameter in place (the same object), so the model's state
dict is the plain model's again once removed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress_eqnet.quantizers import ActivationQuantizer, WeightQuantizer

INPUT_QUANTIZER = "eqnet_input_quantizer"


@dataclass(frozen=True)
class Space:
    """The elastic space: the values each layer's setting may take (EQ-Net's ``SEARCH_SPACE``)."""

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    channel: tuple[bool, ...]
    """Weight granularity choices: True per output channel, False per tensor."""
    w_symmetric: tuple[bool, ...]
    a_symmetric: tuple[bool, ...]
    fixed_bits: int = 8


@dataclass(frozen=True)
class Subnet:
    """One sub-network: per targeted layer (model order) its weight and input bits, weight
    granularity and the symmetry of both grids."""

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    channel: tuple[bool, ...]
    w_symmetric: tuple[bool, ...]
    a_symmetric: tuple[bool, ...]

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) for key, value in asdict(self).items()}

    @classmethod
    def uniform(
        cls, layers: int, w_bits: int, a_bits: int, channel: bool, w_symmetric: bool, a_symmetric: bool
    ) -> Subnet:
        """The same setting in every layer (fixing the first and last is the supernet's job)."""
        return cls(
            (w_bits,) * layers,
            (a_bits,) * layers,
            (channel,) * layers,
            (w_symmetric,) * layers,
            (a_symmetric,) * layers,
        )


class Supernet:
    """Quantizers installed on ``layers`` (name -> module, in model order) and the active sub-network."""

    def __init__(self, layers: dict[str, nn.Module], space: Space) -> None:
        self.layers = layers
        self.space = space
        self.weights = {name: WeightQuantizer(module.weight.shape[0]) for name, module in layers.items()}
        self.inputs = {name: ActivationQuantizer() for name in layers}
        self._hooks: list[Any] = []

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def install(self) -> None:
        """Put the quantizers on the layers (weights reparametrized, inputs quantized by a pre-hook)."""
        for name, module in self.layers.items():
            device = module.weight.device
            parametrize.register_parametrization(module, "weight", self.weights[name].to(device))
            module.add_module(INPUT_QUANTIZER, self.inputs[name].to(device))
            self._hooks.append(module.register_forward_pre_hook(_quantize_input))

    def remove(self) -> None:
        """Take the quantizers off; each layer's ``weight`` is its latent full-precision Parameter again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self.layers.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            if hasattr(module, INPUT_QUANTIZER):
                delattr(module, INPUT_QUANTIZER)

    def quantizer_parameters(self) -> list[nn.Parameter]:
        return [p for quantizer in [*self.weights.values(), *self.inputs.values()] for p in quantizer.parameters()]

    @torch.no_grad()
    def initialize(self, model: nn.Module, run_model: Any) -> None:
        """Every slot's step size from the latent weights and from the inputs each layer sees when
        ``run_model(model)`` runs calibration data through the full-precision model."""
        captured: dict[str, torch.Tensor] = {}
        self.enable(False)
        hooks = [module.register_forward_pre_hook(_capture(name, captured)) for name, module in self.layers.items()]
        try:
            run_model(model)
        finally:
            for hook in hooks:
                hook.remove()
            self.enable(True)
        for name, module in self.layers.items():
            self.weights[name].initialize(latent_weight(module))
            self.inputs[name].initialize(captured[name])

    def enable(self, on: bool) -> None:
        for quantizer in [*self.weights.values(), *self.inputs.values()]:
            quantizer.enabled = on

    # --- sub-networks -------------------------------------------------------------------

    def set(self, subnet: Subnet) -> None:
        """Make ``subnet`` the active sub-network; the first and last layer at ``fixed_bits``."""
        last = len(self.layers) - 1
        for index, name in enumerate(self.layers):
            fixed = index in (0, last)
            weight, inputs = self.weights[name], self.inputs[name]
            weight.bits = self.space.fixed_bits if fixed else subnet.w_bits[index]
            inputs.bits = self.space.fixed_bits if fixed else subnet.a_bits[index]
            weight.channel, weight.symmetric = subnet.channel[index], subnet.w_symmetric[index]
            inputs.symmetric = subnet.a_symmetric[index]

    def _forms(self, rng: random.Random) -> dict[str, tuple[bool, ...]]:
        """Granularity and symmetries drawn per layer (as every ``set_*_subnet`` of the code)."""
        n, space = len(self.layers), self.space
        return {
            "channel": tuple(rng.choice(space.channel) for _ in range(n)),
            "w_symmetric": tuple(rng.choice(space.w_symmetric) for _ in range(n)),
            "a_symmetric": tuple(rng.choice(space.a_symmetric) for _ in range(n)),
        }

    def biggest(self, rng: random.Random) -> Subnet:
        n = len(self.layers)
        return Subnet((max(self.space.w_bits),) * n, (max(self.space.a_bits),) * n, **self._forms(rng))

    def smallest(self, rng: random.Random) -> Subnet:
        n = len(self.layers)
        return Subnet((min(self.space.w_bits),) * n, (min(self.space.a_bits),) * n, **self._forms(rng))

    def random(self, rng: random.Random) -> Subnet:
        n, space = len(self.layers), self.space
        w_bits = tuple(rng.choice(space.w_bits) for _ in range(n))
        a_bits = tuple(rng.choice(space.a_bits) for _ in range(n))
        return Subnet(w_bits, a_bits, **self._forms(rng))

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The quantizers' learned values, on the host (what later stages and resumed runs need)."""
        return {
            "weights": {name: _host(q.state_dict()) for name, q in self.weights.items()},
            "inputs": {name: _host(q.state_dict()) for name, q in self.inputs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.layers:
            self.weights[name].load_state_dict(state["weights"][name])
            self.inputs[name].load_state_dict(state["inputs"][name])


def _host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in tensors.items()}


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])


def _capture(name: str, captured: dict[str, torch.Tensor]) -> Any:
    def hook(_module: nn.Module, args: tuple) -> None:
        captured[name] = args[0].detach()

    return hook


def latent_weight(module: nn.Module) -> torch.Tensor:
    """The full-precision weight behind a layer, whether or not the supernet is installed."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight
