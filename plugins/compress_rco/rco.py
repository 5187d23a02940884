"""RCO: Riemannian constrained optimization of a per-layer choice under an exact budget.

"Model Compression with Exact Budget Constraints via Riemannian Manifolds" (arXiv
2605.00649); official code IST-DASLab/RCO (``src/search/quant.py``:
``optimize_projected_gumbel``, ``InterpolatedModel``, ``round_with_budget_dp``;
``src/manifold.py``). Each step, as the code does it:

1. Gumbel noise g; the hard assignment is the budget-constrained DP argmax of (α + g)/τ
   (:func:`compress_rco.knapsack.budget_choice`, cost at most the budget);
2. forward pass with every layer's weight ``Σ_k p_k W_k`` where p is the one-hot assignment
   in value and ``softmax((α + g)/τ)`` in gradient (straight-through);
3. loss: KL(original ‖ model) over the full vocabulary on a random batch of calibration
   samples (one forward and backward pass per Gumbel sample), the original's
   log-probabilities cached once (:class:`compress.api.ReferenceKL`, on the device when they
   fit); averaged over the Gumbel samples;
4. the gradient loses its component along the closed-form normal at softmax(α) (no noise);
5. Adam step; 6. retraction onto C(α) = B by bisection along the cost (to 1e-4);
7. vector transport: Adam's first moment projected onto the new tangent plane.

τ anneals exponentially, τ_init·(τ_min/τ_init)^progress (the code's schedule; its docstring
says cosine). Logits start at −log of each candidate's error, centred per layer, then
retracted (the code's ``sensitivity`` init uses the normalized ‖W_b − W_ref‖² to the
highest bit width; here the providers' errors to the original, which for gptq are output
errors through the Hessian) or at 0 then retracted (``uniform``). The final assignment
maximizes Σ log p by DP with the budget met as closely as the candidates allow, never above.

Differences from the official code, by choice: the candidate weights are stored whole in the
model's dtype (the code stores bf16 deltas to the highest bit width), so a one-hot
configuration gives exactly the candidate's weights; costs are each candidate's own (with
scales), not nominal bit widths; layers are not grouped (one choice per targeted layer).
Candidates that also quantize the layer's input (``Candidate.inputs``: eqnet's input bits,
which the code's weight-only candidates lack) get their inputs mixed the same way,
``Σ_k p_k Q_k(x)`` (:class:`InputMixture`), so a one-hot sample computes exactly its
configuration and the gradient reaches every candidate's logit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from compress.api import (
    Candidate,
    Context,
    ReferenceKL,
    SearchMethod,
    SearchParams,
    SearchSpace,
    StageRun,
    reference_kl,
)
from compress_rco.knapsack import budget_choice
from compress_rco.manifold import budget_normal, probabilities, project, retract, transport


class RCOParams(SearchParams):
    """Parameters of ``rco``; defaults are the official code's (``rco_search_quant.py``)."""

    steps: int = Field(300, ge=1, description="Optimization steps.")
    lr: float = Field(0.1, gt=0, description="Adam's learning rate on the logits.")
    tau_init: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the first step.")
    tau_min: float = Field(
        0.01, gt=0, description="Temperature at the last step (exponential schedule); the code uses 0.05 for pruning."
    )
    gumbel_samples: int = Field(1, ge=1, description="Gumbel samples per step (gradients averaged).")
    batch_size: int = Field(4, ge=1, description="Calibration samples per step, drawn at random.")
    init: str = Field(
        "sensitivity",
        pattern="^(sensitivity|uniform)$",
        description="Initial logits: 'sensitivity' = −log of each candidate's error; 'uniform' = equal. "
        "Both are then retracted onto the budget.",
    )
    search_units: int = Field(
        1500, ge=10, description="DP grid steps spanning the budget for the hard sample of each step."
    )
    final_units: int = Field(30000, ge=10, description="DP grid steps spanning the budget for the final rounding.")
    retraction_tolerance: float = Field(
        1e-4, gt=0, description="How close the retraction brings the expected cost per weight to the budget."
    )


class Mixture(nn.Module):
    """A layer's weight as ``Σ_k p_k W_k`` over its candidates, p read from ``shared["probs"][row]``."""

    def __init__(self, stack: torch.Tensor, shared: dict[str, torch.Tensor], row: int) -> None:
        super().__init__()
        self.stack, self.shared, self.row = stack, shared, row

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        p = self.shared["probs"][self.row, : self.stack.shape[0]].to(self.stack.dtype)
        return (p @ self.stack.flatten(1)).view(self.stack.shape[1:])


class InputMixture:
    """A forward pre-hook giving a layer the input ``Σ_k p_k Q_k(x)`` over its candidates, where
    ``Q_k`` is candidate k's input quantization (``Candidate.inputs``; none is the identity) and p
    is read from ``shared["probs"][row]``: with p one-hot in value, exactly the chosen candidate's
    input, with p's straight-through gradient. Candidates sharing a quantization share its term."""

    def __init__(self, candidates: list[Candidate], shared: dict[str, torch.Tensor], row: int) -> None:
        self.shared, self.row = shared, row
        terms: dict[int, tuple[Callable[[torch.Tensor], torch.Tensor] | None, list[int]]] = {}
        for k, candidate in enumerate(candidates):
            terms.setdefault(id(candidate.inputs), (candidate.inputs, []))[1].append(k)
        self.terms = list(terms.values())

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x, p = args[0], self.shared["probs"][self.row]
        mixed = sum(p[ks].sum().to(x.dtype) * (x if quantize is None else quantize(x)) for quantize, ks in self.terms)
        return (mixed, *args[1:])


class RCO(SearchMethod):
    """RCO: mixed precision (or sparsity, or both) under an exact budget, optimizing the model's real
    KL to the original on a Riemannian manifold of per-layer candidate distributions.

    Every targeted layer gets logits over the candidates the providers offer (gptq, rtn,
    kl_ptq, ...). Steps of projected Adam on the budget manifold with straight-through Gumbel
    samples, each drawn as the best assignment within the budget, minimize KL(original ‖ model)
    on calibration data; the final assignment is rounded by dynamic programming to the budget
    (never above it; exactly on it when the candidates' costs allow). Needs the whole model on
    the device during the search, and every candidate's weights there (``K x`` the targeted
    weights). Paper: arXiv 2605.00649; code: IST-DASLab/RCO.
    """

    name = "rco"
    Params = RCOParams

    def search(
        self, context: Context, run: StageRun, space: SearchSpace, objective: ReferenceKL | None = None
    ) -> list[int]:
        """RCO over ``space``; ``objective``: the KL on the calibration data when already made."""
        started = time.perf_counter()
        objective = reference_kl(context, "calibration") if objective is None else objective
        seconds = {"reference": time.perf_counter() - started, "objective": 0.0, "dp": 0.0, "manifold": 0.0}
        started = time.perf_counter()
        with mixtures(context.model, space, context.device) as shared:
            seconds["stacks"] = time.perf_counter() - started  # every candidate's weights onto the device

            def loss(probs: torch.Tensor, batch: list[int]) -> torch.Tensor:
                shared["probs"] = probs.to(context.device, torch.float32)
                return objective.loss(context.model, [(index, None) for index in batch], len(batch))

            def progress(step: int, logs: dict[str, float]) -> None:
                context.host.hook.compress_stage_progress(
                    context=context, stage=run.stage, step=step, total=self.params.steps, logs=logs
                )

            choice, history = optimize(space, self.params, loss, len(objective.samples), progress, seconds)
        run.record.details.update({"steps": self.params.steps, "history": history, "seconds": seconds})
        return choice


def initial_logits(space: SearchSpace, params: RCOParams) -> torch.Tensor:
    """Logits at the start, on the budget manifold."""
    valid = space.valid
    if params.init == "sensitivity":
        logits = -torch.log(space.errors + 1e-8)
        mean = logits.masked_fill(~valid, 0).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
        logits = (logits - mean).masked_fill(~valid, 0)
    else:
        logits = torch.zeros_like(space.density)
    retract(logits, space.density, space.share, valid, space.target, params.retraction_tolerance)
    return logits.requires_grad_(True)


def optimize(
    space: SearchSpace,
    params: RCOParams,
    loss: Callable[[torch.Tensor, list[int]], torch.Tensor],
    samples: int,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    seconds: dict[str, float] | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """RCO's loop over ``space`` (its ``density``, ``share``, ``valid``, ``costs``, ``errors`` and
    ``target``): ``loss(probs, batch)`` is the objective of the straight-through probabilities
    (layers x candidates) on a batch of sample indices drawn from ``range(samples)``. Returns the
    final DP assignment and the per-step history; adds the wall time of the objective's forward
    and backward passes, of the DP argmaxes and of the manifold (projection, Adam, retraction,
    transport) to ``seconds``."""
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[key] = seconds.get(key, 0.0) + now - clock
        clock = now

    valid, density, share, target = space.valid, space.density, space.share, space.target
    alpha = initial_logits(space, params)
    optimizer = torch.optim.Adam([alpha], lr=params.lr)
    history: list[dict[str, Any]] = []
    for step in range(params.steps):
        tau = params.tau_init * (params.tau_min / params.tau_init) ** (step / max(params.steps - 1, 1))
        optimizer.zero_grad()
        batch = torch.randperm(samples)[: params.batch_size].tolist()
        value = 0.0
        for _ in range(params.gumbel_samples):
            uniform = torch.rand_like(alpha).clamp(1e-20, 1 - 1e-20)
            noisy = (alpha - torch.log(-torch.log(uniform))) / tau
            soft = probabilities(noisy, valid)
            hard = torch.zeros_like(soft)
            chosen = budget_choice(noisy, space.costs, valid, target, params.search_units)
            hard[torch.arange(len(chosen)), chosen] = 1.0
            lap("dp")
            with torch.enable_grad():
                sample_loss = loss(hard + soft - soft.detach(), batch)
                (sample_loss / params.gumbel_samples).backward()
            value += sample_loss.item() / params.gumbel_samples
            lap("objective")
        alpha.grad = project(alpha.grad, budget_normal(alpha.detach(), density, share, valid))
        optimizer.step()
        expected = retract(alpha, density, share, valid, target, params.retraction_tolerance)
        transport(optimizer, alpha, budget_normal(alpha.detach(), density, share, valid))
        lap("manifold")
        history.append({"step": step + 1, "loss": value, "expected_cost": expected, "tau": tau})
        if progress is not None:
            progress(step + 1, {"loss": value, "tau": tau})
    log_p = probabilities(alpha.detach(), valid).clamp_min(1e-10).log()
    choice = budget_choice(log_p, space.costs, valid, target, params.final_units, exact=True)
    lap("dp")
    return choice, history


@contextmanager
def mixtures(model: nn.Module, space: SearchSpace, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, every layer of ``space`` computes its weight as a :class:`Mixture` of its candidates
    (stacked on ``device``) and, when some candidate quantizes it, its input as an
    :class:`InputMixture`; the model's parameters are frozen. Yields the shared dict whose
    ``"probs"`` the caller sets before each forward pass; on exit the original weights are back."""
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.requires_grad_(False)
    shared: dict[str, torch.Tensor] = {}
    space.current = [None] * len(space.layers)
    handles = []
    try:
        for row, layer in enumerate(space.layers):
            stack = torch.stack([candidate.weight for candidate in layer.candidates]).to(device)
            parametrize.register_parametrization(layer.module, "weight", Mixture(stack, shared, row), unsafe=True)
            if layer.quantizes_inputs:
                handles.append(layer.module.register_forward_pre_hook(InputMixture(layer.candidates, shared, row)))
        yield shared
    finally:
        for handle in handles:
            handle.remove()
        for layer in space.layers:
            if parametrize.is_parametrized(layer.module, "weight"):
                parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
