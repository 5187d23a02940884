"""RCO's invariants on small synthetic problems: the manifold, the retraction, the DP, the mixture."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compress_rco.knapsack import budget_choice, knapsack
from compress_rco.manifold import budget_normal, expected_cost, probabilities, project, retract
from compress_rco.rco import Mixture, RCOParams, optimize


def problem(layers: int = 5, choices: int = 4, seed: int = 0, ragged: bool = True):
    """Random per-weight costs, layer shares and logits; the last layer has one candidate fewer when ``ragged``."""
    generator = torch.Generator().manual_seed(seed)
    density = torch.rand(layers, choices, generator=generator, dtype=torch.float64) * 6 + 2
    share = torch.rand(layers, generator=generator, dtype=torch.float64) + 0.2
    share = share / share.sum()
    valid = torch.ones(layers, choices, dtype=torch.bool)
    if ragged:
        valid[-1, -1] = False
        density[-1, -1] = 0.0
    alpha = torch.randn(layers, choices, generator=generator, dtype=torch.float64)
    return alpha, density, share, valid


def test_closed_form_normal_is_the_gradient_of_the_cost():
    alpha, density, share, valid = problem()
    alpha.requires_grad_(True)
    expected_cost(alpha, density, share, valid).backward()
    torch.testing.assert_close(budget_normal(alpha.detach(), density, share, valid), alpha.grad, rtol=1e-12, atol=1e-14)


def test_projection_is_idempotent_and_orthogonal_to_the_normal():
    alpha, density, share, valid = problem(seed=1)
    normal = budget_normal(alpha, density, share, valid)
    vector = torch.randn_like(alpha)
    once = project(vector, normal)
    assert (once * normal).sum().abs().item() < 1e-12 * vector.norm().item()
    torch.testing.assert_close(project(once, normal), once, rtol=1e-12, atol=1e-14)
    assert (vector - once).norm() > 0.01 * vector.norm()  # it did remove something


def test_shifting_logits_along_the_cost_moves_the_expected_cost_monotonically():
    alpha, density, share, valid = problem(seed=2)
    shifts = torch.linspace(-5, 5, 101, dtype=torch.float64)
    costs = torch.stack([expected_cost(alpha + t * density, density, share, valid) for t in shifts])
    assert (costs.diff() > 0).all()
    assert costs[0] < expected_cost(alpha, density, share, valid) < costs[-1]


@pytest.mark.parametrize("target", [2.5, 4.0, 7.1])
def test_retraction_lands_on_the_budget(target):
    alpha, density, share, valid = problem(seed=3)
    lowest = (density.masked_fill(~valid, float("inf")).min(1).values * share).sum().item()
    highest = (density.max(1).values * share).sum().item()
    target = min(max(target, lowest + 0.05), highest - 0.05)
    reached = retract(alpha, density, share, valid, target, tol=1e-4)
    assert abs(expected_cost(alpha, density, share, valid).item() - target) < 1e-4
    assert reached == pytest.approx(expected_cost(alpha, density, share, valid).item())
    assert probabilities(alpha, valid)[~valid].eq(0).all()


def brute_force(values: np.ndarray, costs: np.ndarray, capacity: int, exact: bool) -> float | None:
    rows, choices = values.shape
    best = None
    for choice in itertools.product(range(choices), repeat=rows):
        value = sum(values[i, k] for i, k in enumerate(choice))
        cost = sum(costs[i, k] for i, k in enumerate(choice))
        if cost > capacity or not np.isfinite(value):
            continue
        key = (cost, value) if exact else (value,)
        best = key if best is None or key > best else best
    return None if best is None else best[-1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exact", [False, True])
def test_dp_equals_brute_force(seed, exact):
    rng = np.random.default_rng(seed)
    rows, choices = 4, 3  # 81 configurations
    values = rng.normal(size=(rows, choices))
    values[rng.integers(rows), rng.integers(choices)] = -np.inf  # a layer lacking a choice
    costs = rng.integers(0, 9, size=(rows, choices))
    capacity = int(rng.integers(5, 25))
    chosen = knapsack(values, costs, capacity, exact)
    best = brute_force(values, costs, capacity, exact)
    if best is None:  # nothing fits
        assert chosen is None
        return
    assert sum(costs[i, k] for i, k in enumerate(chosen)) <= capacity
    assert sum(values[i, k] for i, k in enumerate(chosen)) == pytest.approx(best)


def test_budget_choice_never_exceeds_the_real_budget():
    alpha, density, share, valid = problem(seed=4)
    costs = density * share[:, None]
    budget = 4.37
    chosen = budget_choice(alpha, costs, valid, budget, units=40, exact=True)  # a coarse grid rounds costs
    assert sum(costs[i, k].item() for i, k in enumerate(chosen)) <= budget
    assert all(valid[i, k] for i, k in enumerate(chosen))


def test_a_one_hot_configuration_reproduces_the_candidate_weights_exactly():
    generator = torch.Generator().manual_seed(5)
    stack = torch.randn(4, 6, 8, generator=generator)
    shared = {}
    mixture = Mixture(stack, shared, row=1)
    soft = torch.softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), -1).requires_grad_(True)
    for k in range(4):
        hard = torch.zeros(3, 5, dtype=torch.float64)
        hard[1, k] = 1.0
        shared["probs"] = hard + soft - soft.detach()  # straight-through, as each step uses it
        weight = mixture(torch.empty(0))
        assert torch.equal(weight, stack[k])
        weight.sum().backward()  # the gradient reaches the soft probabilities
        assert soft.grad[1, :4].abs().sum() > 0
        soft.grad = None


@pytest.mark.parametrize("seed", range(2))
def test_rco_reaches_the_dp_optimum_on_a_synthetic_knapsack(seed):
    """A separable objective Σ_i v_i,k_i (each layer's error falls with its bits), so the DP on v
    gives the optimum under the budget; RCO, which only sees the loss, must find it."""
    generator = torch.Generator().manual_seed(seed)
    layers, bits = 8, torch.tensor([2.0, 3.0, 4.0, 8.0], dtype=torch.float64)
    density = bits.repeat(layers, 1)
    share = torch.full((layers,), 1 / layers, dtype=torch.float64)
    sensitivity = torch.rand(layers, generator=generator, dtype=torch.float64) * 10 + 0.1
    values = sensitivity[:, None] * 4.0 ** -bits[None, :]  # error of each layer at each width
    valid = torch.ones(layers, 4, dtype=torch.bool)
    space = SimpleNamespace(
        density=density, share=share, valid=valid, costs=density * share[:, None], errors=values, target=3.5
    )
    params = RCOParams(settings={"bits": [2]}, budget={"bits_per_weight": 3.5}, steps=150, lr=0.05, batch_size=1)

    def loss(probs: torch.Tensor, _batch: list[int]) -> torch.Tensor:
        return (probs * values).sum()

    torch.manual_seed(seed)
    chosen, history = optimize(space, params, loss, samples=1)
    optimum = budget_choice(-values, space.costs, valid, 3.5, units=10000)
    reached = sum(values[i, k].item() for i, k in enumerate(chosen))
    best = sum(values[i, k].item() for i, k in enumerate(optimum))
    assert reached == pytest.approx(best, rel=1e-9)
    assert space.costs[torch.arange(layers), chosen].sum().item() <= 3.5
    assert all(abs(entry["expected_cost"] - 3.5) < 1e-4 for entry in history)


def test_evopress_level_switches_keep_the_budget_on_an_unevenly_spaced_ladder():
    """Bits 2, 3, 4, 8: one level down from 4 saves 1 bit, one level up from 4 adds 4."""
    from torch import nn

    from compress.api import Budget
    from compress.search_method import LayerChoices, SearchSpace
    from compress_rco.evopress import Evolution

    layers = [
        LayerChoices(
            f"l{i}", nn.Linear(8, 8, bias=False), [SimpleNamespace(cost=64 * b, error=0.0) for b in (2, 3, 4, 8)]
        )
        for i in range(6)
    ]
    space = SearchSpace(layers, Budget.model_validate({"bits_per_weight": 3.5}))
    evolution = Evolution(space, random.Random(0))
    parent = evolution.lowered(evolution.ceiling())
    budget = space.cost(parent)
    accepted = 0
    for _ in range(500):
        child = evolution.mutated(parent, "cost")
        if child is not None:
            assert space.cost(child) == pytest.approx(budget)
            parent, accepted = child, accepted + 1
    assert accepted > 0
