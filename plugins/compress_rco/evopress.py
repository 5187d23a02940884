"""EvoPress: (1+λ) evolutionary search for a per-layer choice under a budget.

Sieberling, Kuznedelev, Kurtic, Alistarh, "EvoPress: Accurate Dynamic Model Compression via
Evolutionary Search" (ICML 2025); official code IST-DASLab/EvoPress, ``evo_quant_search.py``.
As there:

- a layer's levels are its candidates ordered by cost;
- initialization: every layer at the level just above the budget (the code's
  ``ceil(target_bitwidth)``), then random layers lowered one level until the budget holds;
  when that needs lowering, ``initial`` such points are drawn and the fittest on
  ``initial_tokens`` tokens is the first parent;
- mutation: min(U{1..3}, U{1..3}) level switches; each lowers one layer and raises another of
  the same group by one level, so the cost does not change (``group_rule: cost``, the code's
  ``size`` rule: layers whose candidate costs are equal; on an unevenly spaced ladder, such as
  bits 2, 3, 4, 8, the raised layer is one whose step up costs exactly the step down, which
  the code's evenly spaced levels never need); with ``group_rule: none`` levels
  are raised in random layers, then lowered in random layers until the budget holds, and an
  offspring needing more than 10 changes or adding less than 0.8 of the cost it removes is
  dropped; duplicates of the parent or of another offspring are dropped;
- selection in stages, each on a fresh random set of calibration samples cut to exactly
  that stage's token count, keeping that stage's number of survivors; the parent joins at
  the last stage (elitist);
- fitness: KL(original ‖ model) per token (the code's ``kl``).

Groups are by equal cost ladders rather than by weight size, so candidates of any provider
trade exactly; for a quantization database this is the code's ``size`` rule.
"""

from __future__ import annotations

import math
import random
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.api import Context, ReferenceKL, SearchMethod, SearchParams, SearchSpace, StageRun, reference_kl

MAX_CHANGES = 10
"""``group_rule: none``: offspring needing more level changes are dropped (the code's limit)."""
MIN_ADDED_RATIO = 0.8
"""``group_rule: none``: offspring adding less than this fraction of the cost they remove are dropped."""


class EvoPressParams(SearchParams):
    """Parameters of ``evopress``; defaults are the official quantization search's (``scripts/``)."""

    generations: int = Field(150, ge=1, description="Generations of the (1+λ) search.")
    offspring: int = Field(128, ge=1, description="Offspring per generation (λ).")
    survivors: list[int] = Field(
        [16, 4, 1], min_length=1, description="Survivors after each selection stage; the last must be 1."
    )
    tokens: list[int] = Field(
        [2048, 16384, 131072],
        min_length=1,
        description="Calibration tokens each selection stage scores on (as many entries as survivors); "
        "capped at what the calibration data holds.",
    )
    initial: int = Field(
        128, ge=1, description="Random initial points drawn when the budget lies below the level above it."
    )
    initial_tokens: int = Field(2048, ge=1, description="Tokens the initial points are scored on.")
    batch_size: int = Field(
        8,
        ge=1,
        description="Calibration samples per forward pass when scoring (speed and memory only; the code uses 1).",
    )
    time_limit: float | None = Field(
        None,
        gt=0,
        description="Stop after the first generation that ends this many seconds into the search (not in the "
        "official code: a wall-clock budget, to compare searches at equal time).",
    )
    group_rule: Literal["cost", "none"] = Field(
        "cost",
        description="'cost': a mutation trades one level between two layers with equal candidate costs "
        "(the budget is kept exactly); 'none': any layers, then lowered back within the budget.",
    )

    @model_validator(mode="after")
    def _stages(self) -> EvoPressParams:
        if len(self.survivors) != len(self.tokens):
            raise ValueError("survivors and tokens need one entry per selection stage")
        if self.survivors[-1] != 1:
            raise ValueError("the last selection stage keeps 1 survivor")
        return self


class EvoPress(SearchMethod):
    """EvoPress: (1+λ) evolutionary search for one candidate per layer under a budget, with KL to the
    original as fitness, scored in stages on growing token counts.

    Mutations switch levels between layers without changing the cost; the fittest of the
    offspring and the parent becomes the next parent. Works over any provider's candidates
    (quantization levels, sparsity levels). The baseline ``rco`` is measured against.
    Paper: Sieberling et al., ICML 2025; code: IST-DASLab/EvoPress.
    """

    name = "evopress"
    Params = EvoPressParams

    def search(
        self, context: Context, run: StageRun, space: SearchSpace, objective: ReferenceKL | None = None
    ) -> list[int]:
        """EvoPress over ``space``; ``objective``: the KL on the calibration data when already made."""
        params: EvoPressParams = self.params
        started = time.perf_counter()
        objective = reference_kl(context, "calibration") if objective is None else objective
        evolution = Evolution(space, random.Random(context.recipe.run.seed))
        seconds = {"reference": time.perf_counter() - started, "fitness": 0.0, "load": 0.0}

        def fitness(configurations: list[list[int]], tokens: int) -> list[float]:
            pieces = evolution.pieces(objective.tokens, tokens)
            scores = []
            with torch.no_grad():
                for configuration in configurations:
                    clock = time.perf_counter()
                    space.put(configuration)
                    loaded = time.perf_counter()
                    scores.append(objective.loss(context.model, pieces, params.batch_size).item())
                    seconds["load"] += loaded - clock
                    seconds["fitness"] += time.perf_counter() - loaded
            return scores

        parent = evolution.ceiling()
        score = float("inf")
        if space.cost(parent) > space.target * (1 + 1e-12):
            points = [evolution.lowered(parent) for _ in range(params.initial)]
            scores = fitness(points, params.initial_tokens)
            best = min(range(len(points)), key=scores.__getitem__)
            parent, score = points[best], scores[best]
        history = []
        for generation in range(params.generations):
            children: list[list[int]] = []
            attempts = 0
            while len(children) < params.offspring and attempts < 100 * params.offspring:
                attempts += 1
                child = evolution.mutated(parent, params.group_rule)
                if child is not None and child != parent and child not in children:
                    children.append(child)
            population = children
            for keep, tokens in zip(params.survivors, params.tokens):
                if keep == params.survivors[-1] and parent not in population:
                    population.append(parent)
                scores = fitness(population, tokens)
                order = sorted(range(len(population)), key=scores.__getitem__)[:keep]
                population, scores = [population[i] for i in order], [scores[i] for i in order]
            parent, score = population[0], scores[0]
            history.append({"generation": generation + 1, "kl": score, "cost": space.cost(parent)})
            context.host.hook.compress_stage_progress(
                context=context, stage=run.stage, step=generation + 1, total=params.generations, logs={"kl": score}
            )
            if params.time_limit is not None and time.perf_counter() - started > params.time_limit:
                break
        seconds["search"] = time.perf_counter() - started
        run.record.details.update({"generations": len(history), "history": history, "seconds": seconds})
        return parent


class Evolution:
    """Levels, groups and the random moves of the search over ``space``."""

    def __init__(self, space: SearchSpace, rng: random.Random) -> None:
        self.space, self.rng = space, rng
        self.costs = space.costs
        # each layer's candidate indices from the cheapest to the dearest: its levels
        self.levels = [
            sorted(range(len(layer.candidates)), key=lambda k, i=i: self.costs[i, k].item())
            for i, layer in enumerate(space.layers)
        ]
        ladders: dict[tuple[float, ...], list[int]] = {}
        for i, (layer, levels) in enumerate(zip(space.layers, self.levels)):
            ladders.setdefault(tuple(layer.candidates[k].cost for k in levels), []).append(i)
        self.groups = list(ladders.values())

    def level(self, configuration: list[int], i: int) -> int:
        return self.levels[i].index(configuration[i])

    def shifted(self, configuration: list[int], i: int, step: int) -> bool:
        """Move layer i one level up (+1) or down (−1) in place; False when it cannot."""
        position = self.level(configuration, i) + step
        if not 0 <= position < len(self.levels[i]):
            return False
        configuration[i] = self.levels[i][position]
        return True

    def step_cost(self, configuration: list[int], i: int, step: int) -> float:
        """The cost added by moving layer i one level up (+1) or down (−1); the move must exist."""
        position = self.level(configuration, i)
        return self.costs[i, self.levels[i][position + step]].item() - self.costs[i, configuration[i]].item()

    def ceiling(self) -> list[int]:
        """Every layer at its cheapest level costing at least the budget per weight (else its dearest)."""
        configuration = []
        for i, levels in enumerate(self.levels):
            above = [k for k in levels if self.space.density[i, k].item() >= self.space.target]
            configuration.append(above[0] if above else levels[-1])
        return configuration

    def random_group(self) -> list[int]:
        """A group drawn with probability proportional to its number of layers (the code's rule)."""
        return self.rng.choices(self.groups, weights=[len(group) for group in self.groups])[0]

    def lowered(self, configuration: list[int]) -> list[int]:
        """A copy with random layers lowered one level at a time until the budget holds."""
        configuration = list(configuration)
        while self.space.cost(configuration) > self.space.target * (1 + 1e-12):
            lower = [i for i in self.random_group() if self.level(configuration, i) > 0]
            if lower:
                self.shifted(configuration, self.rng.choice(lower), -1)
        return configuration

    def mutated(self, parent: list[int], rule: str) -> list[int] | None:
        """An offspring of ``parent``, or None when the draw is dropped."""
        child = list(parent)
        flips = min(self.rng.randint(1, 3), self.rng.randint(1, 3))
        if rule == "cost":
            for _ in range(flips):
                group = self.random_group()
                lower = [i for i in group if self.level(child, i) > 0]
                if not lower:
                    return None
                down = self.rng.choice(lower)
                saved = -self.step_cost(child, down, -1)
                # On an unevenly spaced ladder (bits 2, 3, 4, 8) one level up is not worth one level
                # down everywhere: only a layer whose step up costs exactly what was saved keeps the budget.
                raise_ = [
                    i
                    for i in group
                    if i != down
                    and self.level(child, i) < len(self.levels[i]) - 1
                    and math.isclose(self.step_cost(child, i, +1), saved, rel_tol=1e-9, abs_tol=1e-9)
                ]
                if not raise_:
                    return None
                self.shifted(child, down, -1)
                self.shifted(child, self.rng.choice(raise_), +1)
            return child
        added = removed = 0.0
        changes = flips
        for _ in range(flips):
            raise_ = [i for i in self.random_group() if self.level(child, i) < len(self.levels[i]) - 1]
            if not raise_:
                return None
            i = self.rng.choice(raise_)
            before = self.costs[i, child[i]].item()
            self.shifted(child, i, +1)
            added += self.costs[i, child[i]].item() - before
        while self.space.cost(child) > self.space.target * (1 + 1e-12):
            changes += 1
            if changes > MAX_CHANGES:
                return None
            lower = [i for i in self.random_group() if self.level(child, i) > 0]
            if not lower:
                continue
            i = self.rng.choice(lower)
            before = self.costs[i, child[i]].item()
            self.shifted(child, i, -1)
            removed += before - self.costs[i, child[i]].item()
        if added / max(removed, 1e-30) < MIN_ADDED_RATIO:
            return None
        return child

    def pieces(self, available: list[int], tokens: int) -> list[tuple[int, int]]:
        """Random distinct samples holding exactly ``tokens`` scored positions (the last one cut), or
        every sample when they hold fewer: (index, leading tokens to use)."""
        order = list(range(len(available)))
        self.rng.shuffle(order)
        pieces, used = [], 0
        for index in order:
            if used >= tokens:
                break
            take = min(available[index], tokens - used)
            pieces.append((index, take + 1))  # positions + 1 input tokens give ``take`` next-token targets
            used += take
        return pieces
