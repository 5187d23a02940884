"""RCO's mixture of candidates' input quantizations: the chosen candidate's input in value, gradients to
the probabilities of every candidate."""

from __future__ import annotations

import torch
from torch import nn

from compress.api import Candidate, LayerState
from compress_rco.rco import InputMixture


def coarse(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 2) / 2


def fine(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 8) / 8


def test_a_one_hot_input_mixture_is_the_chosen_quantization_with_gradients_to_every_probability():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    quantizations = [coarse, fine, None, coarse]
    candidates = [Candidate("m", {}, 0.0, 0.0, layer.weight.detach(), LayerState("m"), q) for q in quantizations]
    shared: dict[str, torch.Tensor] = {}
    mixture = InputMixture(candidates, shared, row=1)
    assert len(mixture.terms) == 3  # the two coarse candidates share one term
    x = torch.randn(3, 8) * 3
    for k, expected in enumerate([coarse(x), fine(x), x, coarse(x)]):
        logits = torch.zeros(2, 5, requires_grad=True)  # row 1 is this layer's; a padded fifth column
        soft = torch.softmax(logits, -1)
        hard = torch.zeros(2, 5)
        hard[1, k] = 1.0
        shared["probs"] = hard + soft - soft.detach()
        (mixed,) = mixture(layer, (x,))
        assert torch.equal(mixed, expected)
        layer(mixed).pow(2).sum().backward()
        grad = logits.grad[1, :4]
        assert grad.abs().min() > 0
        assert torch.all(logits.grad[0] == 0)  # another layer's row
