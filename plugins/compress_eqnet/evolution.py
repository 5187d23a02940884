"""The genetic search of EQ-Net (``search/search_algorithm/evolution.py``, ``EvolutionFinder``).

A population of per-layer bit widths (weights and inputs) that meet the constraint; each
generation keeps the best ``parent_ratio`` by predicted accuracy, and refills the population
with ``mutation_ratio`` mutants (each gene redrawn with probability ``mutate_prob``; the
code's class default 0.1 is what runs, the script's 0.3 never reaches it) and crossovers
(each gene from either parent); a child is redrawn until it meets the constraint. The best
sub-network ever seen is returned.

The initial population is drawn by :func:`sample_bits`: the code draws per-layer bits from
probability maps built from 500k random configurations binned by average bits; here each
layer's bits are drawn with weight ``exp(-(b - t)² / 2)`` around a target ``t`` (our choice,
same purpose: configurations whose average lies near the budget).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Genes = tuple[tuple[int, ...], tuple[int, ...]]
"""Per-layer weight bits and input bits."""

MAX_TRIES = 2000
"""Redraws of a child before it is given up (the code loops forever)."""


def sample_bits(choices: Sequence[int], layers: int, target: float, rng: random.Random) -> tuple[int, ...]:
    """``layers`` bit widths from ``choices``, each drawn with weight ``exp(-(b - target)² / 2)``."""
    weights = [math.exp(-((b - target) ** 2) / 2) for b in choices]
    return tuple(rng.choices(list(choices), weights=weights, k=layers))


@dataclass
class Evolution:
    """The genetic search over ``layers`` genes of weight bits ``w_choices`` and input bits ``a_choices``."""

    w_choices: Sequence[int]
    a_choices: Sequence[int]
    layers: int
    feasible: Callable[[Genes], bool]
    """Whether a configuration meets the constraint."""
    predict: Callable[[list[Genes]], list[float]]
    """Predicted accuracies of configurations."""
    targets: tuple[float, float]
    """Where :func:`sample_bits` centres the initial weight and input bits."""
    rng: random.Random
    population: int = 100
    generations: int = 500
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1

    def random_valid(self) -> Genes:
        for _ in range(MAX_TRIES):
            genes = (
                sample_bits(self.w_choices, self.layers, self.targets[0], self.rng),
                sample_bits(self.a_choices, self.layers, self.targets[1], self.rng),
            )
            if self.feasible(genes):
                return genes
        raise RuntimeError(f"no configuration meeting the constraint in {MAX_TRIES} draws")

    def mutate(self, genes: Genes) -> Genes:
        for _ in range(MAX_TRIES):
            w = tuple(self.rng.choice(self.w_choices) if self.rng.random() < self.mutate_prob else b for b in genes[0])
            a = tuple(self.rng.choice(self.a_choices) if self.rng.random() < self.mutate_prob else b for b in genes[1])
            if self.feasible((w, a)):
                return w, a
        return genes

    def crossover(self, first: Genes, second: Genes) -> Genes:
        for _ in range(MAX_TRIES):
            child = tuple(
                tuple(self.rng.choice(pair) for pair in zip(mine, theirs)) for mine, theirs in zip(first, second)
            )
            if self.feasible(child):
                return child
        return first

    def run(self) -> tuple[float, Genes, list[float]]:
        """The best predicted accuracy, its configuration, and the best after each generation."""
        children = [self.random_valid() for _ in range(self.population)]
        population = list(zip(self.predict(children), children))
        parents_size = max(1, round(self.parent_ratio * self.population))
        mutants = round(self.mutation_ratio * self.population)
        best: tuple[float, Genes] = max(population, key=lambda item: item[0])
        history = []
        for _ in range(self.generations):
            parents = sorted(population, key=lambda item: item[0], reverse=True)[:parents_size]
            if parents[0][0] > best[0]:
                best = parents[0]
            history.append(best[0])
            children = [self.mutate(self.rng.choice(parents)[1]) for _ in range(mutants)]
            children += [
                self.crossover(self.rng.choice(parents)[1], self.rng.choice(parents)[1])
                for _ in range(self.population - mutants)
            ]
            population = parents + list(zip(self.predict(children), children))
        final = max(population, key=lambda item: item[0])
        if final[0] > best[0]:
            best = final
        return best[0], best[1], history
