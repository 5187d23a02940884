"""EQ-Net's parts on their own: LSQ+ quantizers, supernet, losses, predictor, genetic search."""

from __future__ import annotations

import random

import pytest
import torch
from compress_eqnet.efficiency import Efficiency
from compress_eqnet.evolution import Evolution
from compress_eqnet.losses import soft_kl, standardized_moment, wdr_terms
from compress_eqnet.predictor import Encoder, fit_predictor
from compress_eqnet.quantizers import ActivationQuantizer, WeightQuantizer, code_range, initial_range
from compress_eqnet.supernet import INPUT_QUANTIZER, Space, Subnet, Supernet
from torch import nn

from compress.api import QuantGrid, QuantScheme

SPACE = Space((2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8), (True, False), (True, False), (True, False))


def test_initial_range_is_the_best_of_the_shrinkings():
    x = torch.randn(3, 50)
    scale, _ = initial_range(x, 3, symmetric=False, unsigned=False)
    low, high = code_range(3, False)
    for row in range(3):
        errors = []
        for i in range(80):
            hi, lo = x[row].max() * (1 - 0.01 * i), x[row].min() * (1 - 0.01 * i)
            s = (hi - lo) / (high - low)
            b = lo - s * low
            q = torch.clamp(((x[row] - b) / s).round(), low, high) * s + b
            errors.append(((x[row] - q).abs() ** 2.4).mean().item())
        best = min(range(80), key=errors.__getitem__)
        expected = (x[row].max() - x[row].min()) * (1 - 0.01 * best) / (high - low)
        torch.testing.assert_close(scale[row], expected)


def test_symmetric_weight_quantizer_is_the_recorded_grid():
    weight = torch.randn(4, 3, 3, 3)
    quantizer = WeightQuantizer(4)
    quantizer.initialize(weight)
    for channel in (True, False):
        quantizer.bits, quantizer.channel, quantizer.symmetric = 3, channel, True
        scale = quantizer.step()[0].detach().abs() + 1e-6
        scheme = QuantScheme(bits=3, granularity="channel" if channel else "tensor", symmetric=True)
        grid = QuantGrid(scheme, scale if channel else scale.reshape(1), None)
        expected = grid.fake_quantize(weight.flatten(1)).view_as(weight)
        torch.testing.assert_close(quantizer(weight), expected)
        assert quantizer(weight).flatten(1).unique(dim=None).numel() <= (8 if not channel else 8 * 4)


def test_each_setting_learns_its_own_step_size():
    weight = nn.Parameter(torch.randn(4, 8))
    quantizer = WeightQuantizer(4)
    quantizer.initialize(weight)
    quantizer.bits, quantizer.channel, quantizer.symmetric = 4, True, False
    quantizer(weight).pow(2).sum().backward()
    assert quantizer.scale_channel_asym.grad[:, 2].abs().sum() > 0
    assert quantizer.scale_channel_asym.grad[:, [0, 1, 3, 4, 5, 6]].abs().sum() == 0
    assert quantizer.scale_channel_sym.grad is None or quantizer.scale_channel_sym.grad.abs().sum() == 0
    assert quantizer.scale_tensor_asym.grad is None or quantizer.scale_tensor_asym.grad.abs().sum() == 0
    assert weight.grad.abs().sum() > 0  # straight-through to the latent weight


def test_activation_quantizer_is_unsigned_after_a_relu():
    quantizer = ActivationQuantizer()
    x = torch.relu(torch.randn(2, 64))
    quantizer.initialize(x)
    assert bool(quantizer.unsigned)
    quantizer.bits, quantizer.symmetric = 2, True
    assert quantizer(x).unique().numel() <= 4 and quantizer(x).min() >= 0


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def test_install_and_remove_leave_the_plain_layers():
    net = small_net()
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    weights = {name: m.weight for name, m in layers.items()}
    keys = set(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    plain = net(x)
    supernet = Supernet(layers, SPACE)
    supernet.install()
    supernet.initialize(net, lambda model: model(x))
    supernet.set(Subnet.uniform(3, 2, 2, True, True, True))
    assert [supernet.weights[n].bits for n in layers] == [8, 2, 8]  # first and last fixed
    assert not torch.equal(net(x), plain)
    supernet.remove()
    assert set(net.state_dict()) == keys
    assert all(layers[name].weight is weights[name] for name in layers)
    assert not any(hasattr(m, INPUT_QUANTIZER) for m in layers.values())
    torch.testing.assert_close(net(x), plain)


def test_sandwich_subnets_span_the_space():
    net = small_net()
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    supernet = Supernet(layers, SPACE)
    rng = random.Random(0)
    assert set(supernet.biggest(rng).w_bits) == {8} and set(supernet.smallest(rng).a_bits) == {2}
    drawn = {bits for _ in range(50) for bits in supernet.random(rng).w_bits}
    assert drawn == set(SPACE.w_bits)


def test_wdr_penalties_vanish_for_a_uniform_symmetric_weight():
    uniform = torch.linspace(-1, 1, 100001)
    kurtosis, skewness = wdr_terms([uniform], 1.8)
    assert kurtosis.item() < 1e-4 and skewness.item() < 1e-8
    assert standardized_moment(torch.randn(100000), 4).item() == pytest.approx(3.0, abs=0.1)


def test_soft_kl_is_half_ce_for_identical_logits():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    expected = 0.5 * nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(soft_kl(logits, logits, labels), expected)


def test_average_bits_leave_out_first_and_last():
    efficiency = Efficiency([{"params": 10, "feature_map": 5, "macs": 100}] * 4, fixed_bits=8)
    assert efficiency.average_bits((2, 3, 5, 2), (2, 4, 4, 2)) == (4.0, 4.0)
    assert efficiency.bitops((2, 3, 5, 2), (2, 4, 4, 2)) == 100 * (64 + 12 + 20 + 64)


def test_predictor_ranks_a_learnable_accuracy():
    layers = 6
    encoder = Encoder(SPACE, layers)
    rng = random.Random(0)
    subnets = [
        Subnet(
            tuple(rng.choice(SPACE.w_bits) for _ in range(layers)),
            tuple(rng.choice(SPACE.a_bits) for _ in range(layers)),
            (True,) * layers,
            (True,) * layers,
            (False,) * layers,
        )
        for _ in range(300)
    ]
    accuracy = torch.tensor([0.5 + 0.02 * sum(s.w_bits[1:-1]) / 4 + 0.01 * sum(s.a_bits[1:-1]) / 4 for s in subnets])
    fit = fit_predictor(encoder.encode_all(subnets), accuracy, epochs=60, seed=0)
    assert fit.kendall_tau > 0.6 and fit.test_size == 60
    # the condition slots: asymmetric inputs set their own slot (the reference code never does)
    assert encoder.encode(subnets[0])[[0, 2, 5]].tolist() == [1, 1, 1]


def test_evolution_meets_the_constraint_and_climbs():
    layers = 8
    efficiency = Efficiency([{"params": 1, "feature_map": 1, "macs": 1}] * layers, fixed_bits=8)

    def feasible(genes):
        w, a = efficiency.average_bits(*genes)
        return 3.5 < w <= 4 and 3.5 < a <= 4

    def predict(population):
        return [float(sum(g[0][1:4]) - sum(g[0][4:7])) for g in population]  # wants bits early, few late

    evolution = Evolution(
        SPACE.w_bits,
        SPACE.a_bits,
        layers,
        feasible,
        predict,
        (3.75, 3.75),
        random.Random(0),
        population=20,
        generations=30,
    )
    score, genes, history = evolution.run()
    assert feasible(genes) and history == sorted(history)
    assert score >= max(predict([evolution.random_valid() for _ in range(50)]))


class ThreeConvs(nn.Module):
    """Three convolutions on ``pixel_values`` and a Linear the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 2, 1))
        self.unused = nn.Linear(2, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convs(pixel_values)


def test_the_bitops_check_counts_macs_on_the_meta_model_as_the_run_counts_them():
    from compress_eqnet.efficiency import layer_costs
    from compress_eqnet.method import EQNet, EQNetParams
    from compress_eqnet.search import EQNetSearch, EQNetSearchParams

    from compress.api import UserError

    model = ThreeConvs()
    names = ["convs.0", "convs.1", "convs.2"]
    costs = layer_costs(model, {name: model.get_submodule(name) for name in names}, torch.randn(1, 3, 9, 9))
    smallest = Efficiency([costs[name] for name in names], 8).bitops((2, 2, 2), (2, 2, 2))
    eqnet = EQNet(EQNetParams(steps=1))
    meta = ThreeConvs().to("meta")
    inputs = {"pixel_values": torch.empty(1, 3, 9, 9, device="meta")}
    EQNetSearch(EQNetSearchParams(bitops=smallest)).check_forward(meta, inputs, [(eqnet, names)])
    with pytest.raises(UserError, match=f"smallest reachable bitops: {smallest:.6g}, "):
        EQNetSearch(EQNetSearchParams(bitops=smallest - 1)).check_forward(meta, inputs, [(eqnet, names)])
    with pytest.raises(UserError, match="never calls unused, a layer of the eqnet stage"):
        EQNetSearch(EQNetSearchParams(bitops=smallest)).check_forward(meta, inputs, [(eqnet, [*names, "unused"])])
