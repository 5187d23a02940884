"""Scoring a model against a reference on a named dataset, for methods that compare many
variants (search, allocation): KL, top-1 agreement, accuracy, or any registered metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from compress.blocks import block_outputs, device_batch, forward, hidden_states, skipping_blocks
from compress.data import IGNORE_INDEX, collate
from compress.devices import host_copy, move, onloaded, pinned, settle
from compress.errors import UserError, did_you_mean
from compress.evaluate import Metric, metric_key, next_token_labels, next_token_log_probs
from compress.recipe import MetricSpec, ModelSpec

if TYPE_CHECKING:
    from compress.context import Context


class Scorer:
    """Scores models on one dataset against one reference, block by block, with the
    registered metrics (those of ``evaluate:``, the same classes and the same math).

    ``reference`` is the original model by default (``context.reference_model()``), or
    another checkpoint, written like a recipe's ``model:`` and loaded with
    ``context.load_model``. It runs once, when the scorer is made, one block on the
    device at a time; what is kept of it is its last block's output per sample, on the
    host: samples x tokens x hidden values. Its full logits would be samples x tokens x
    vocabulary (85 times more for SmolLM2: 13 GB for 128 samples of 512 tokens), and
    top-k log-probabilities would make KL approximate; so each :meth:`score` recomputes the
    reference's outputs from the kept states through its modules after the blocks (final
    norm and head: one matrix product per token, little next to the blocks).

    Each :meth:`score` runs the scored model block by block (in both run modes only one
    block of it is on the device at a time; modules outside the blocks are moved there
    while used), then both models' heads sample by sample, feeding fresh metrics. Repeat
    calls read nothing and load nothing again. ``metrics`` are names, or ``evaluate:``-style
    entries with parameters (``{"metric": "top1", "k": 5}``); results are keyed like the
    report's evaluation (``kl``, ``top1(k=5)``).
    """

    def __init__(
        self,
        context: Context,
        data: str,
        metrics: Sequence[str | dict[str, Any]] = ("kl", "top1"),
        reference: ModelSpec | str | None = None,
    ) -> None:
        if data not in context.recipe.data:
            raise UserError(f"the scorer reads data {data!r}, which the recipe's data: lacks")
        self.device = context.device
        self.context = context
        self.samples = context.data(data)
        registered = context.host.metrics()
        self.specs: list[MetricSpec] = []
        for entry in metrics:
            try:
                spec = MetricSpec.model_validate({"metric": entry} if isinstance(entry, str) else entry)
                if spec.metric not in registered:
                    raise UserError(f"unknown metric {spec.metric!r}{did_you_mean(spec.metric, list(registered))}")
                registered[spec.metric].Params.model_validate(spec.params)
            except ValidationError as error:
                raise UserError(f"metric {entry!r}: {error.errors()[0]['msg']}") from None
            self.specs.append(spec)
        self.reference = context.reference_model() if reference is None else context.load_model(reference)
        (finals,), self.reference_returns_tuple = block_outputs(self.reference, self.samples, self.device)
        self.reference_finals = [hidden_states(args, kwargs) for args, kwargs in finals]

    def metrics(self) -> list[Metric]:
        """Fresh instances of the scorer's metrics."""
        registered = self.context.host.metrics()
        return [registered[s.metric](registered[s.metric].Params.model_validate(s.params)) for s in self.specs]

    @torch.no_grad()
    def score(self, model: nn.Module | None = None) -> dict[str, float]:
        """Each metric's ``compressed`` value for ``model`` (default: ``context.model`` as it is now)
        against the reference, e.g. ``{"kl": 0.02, "top1": 0.93}``."""
        model = self.context.model if model is None else model
        (finals,), returns_tuple = block_outputs(model, self.samples, self.device)
        metrics = self.metrics()
        with skipping_blocks(model, self.device, returns_tuple) as run:
            if model is self.reference:  # one replacement of the blocks serves both
                self._feed(metrics, finals, run, run)
            else:
                with skipping_blocks(self.reference, self.device, self.reference_returns_tuple) as run_reference:
                    self._feed(metrics, finals, run, run_reference)
        return {metric_key(spec): metric.result()["compressed"] for spec, metric in zip(self.specs, metrics)}

    def _feed(self, metrics: list[Metric], finals: list[tuple[tuple, dict]], run: Any, run_reference: Any) -> None:
        for sample, (args, kwargs), reference_final in zip(self.samples, finals, self.reference_finals):
            batch = device_batch(sample, self.device)
            output = run(batch, hidden_states(args, kwargs).to(self.device))
            reference_output = run_reference(batch, reference_final.to(self.device))
            for metric in metrics:
                metric.update(reference_output, output, batch)


class ReferenceKL:
    """KL(original ‖ model) of the next-token distributions on one dataset, differentiable, with the
    original's log-probabilities computed once: the objective of searches that score whole
    configurations (RCO's gradient steps, EvoPress's fitness).

    When made, the reference (``context.reference_model()``) runs over the samples block by
    block (one block on the device at a time, as :class:`Scorer` does) and its full-vocabulary
    next-token log-probabilities are kept in ``dtype`` (float16, as RCO caches them: samples x
    tokens x vocabulary x 2 bytes, 6.4 GB for 128 x 512 tokens of SmolLM2). They stay on the
    device when they take at most a quarter of its free memory (no copy per step), else on
    the host (page-locked when the device is CUDA). :meth:`loss` then runs the scored model
    whole, several samples per forward pass, on the device where its parameters are, so the
    caller puts it there (a search onloads the model for the search in both run modes). One
    instance can serve several searches over the same data (``objective=`` of rco and evopress).
    """

    def __init__(self, context: Context, data: str = "calibration", dtype: torch.dtype = torch.float16) -> None:
        if data not in context.recipe.data:
            raise UserError(f"the KL objective reads data {data!r}, which the recipe's data: lacks")
        self.device = context.device
        self.samples = context.data(data)
        reference = context.reference_model()
        (finals,), returns_tuple = block_outputs(reference, self.samples, self.device)
        self.log_probs: list[torch.Tensor] = []
        self.tokens: list[int] = []
        """Scored next-token positions of each sample."""
        store = None
        with torch.no_grad(), skipping_blocks(reference, self.device, returns_tuple) as run:
            for sample, (args, kwargs) in zip(self.samples, finals):
                batch = device_batch(sample, self.device)
                log_probs = next_token_log_probs(run(batch, hidden_states(args, kwargs).to(self.device)))[0]
                if store is None:
                    store = self._store(log_probs.shape[-1] * torch.finfo(dtype).bits // 8)
                self.log_probs.append(self._keep(log_probs.to(dtype), store))
                self.tokens.append(int((next_token_labels(batch)[0] != IGNORE_INDEX).sum()))
        settle(self.device)  # page-locked copies of the cache have landed

    def _store(self, bytes_per_position: int) -> torch.device:
        """Where the cache goes: the device when it takes at most a quarter of its free memory."""
        if self.device.type != "cuda":
            return self.device
        positions = sum(max(len(sample["input_ids"]) - 1, 0) for sample in self.samples)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if positions * bytes_per_position <= free // 4 else torch.device("cpu")

    def _keep(self, log_probs: torch.Tensor, store: torch.device) -> torch.Tensor:
        if store.type == "cpu" and pinned(self.device):
            return host_copy(log_probs, None)
        return log_probs.to(store)

    def loss(self, model: nn.Module, pieces: Sequence[tuple[int, int | None]], batch_size: int = 8) -> torch.Tensor:
        """Mean per scored token of KL(original ‖ ``model``) over ``pieces``, each a sample index and
        how many leading tokens of it to use (None: all), as a scalar tensor that carries gradients
        when grad mode is on. Pieces run ``batch_size`` per forward pass (right-padded, padding unscored)."""
        total = torch.zeros((), device=self.device)
        tokens = 0
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start : start + batch_size]
            samples = [{key: value[:length] for key, value in self.samples[i].items()} for i, length in chunk]
            batch = move(collate(samples, 0), self.device)
            scored = next_token_labels(batch) != IGNORE_INDEX
            log_q = next_token_log_probs(forward(model, batch))
            reference = torch.zeros_like(log_q)
            for row, ((index, _), sample) in enumerate(zip(chunk, samples)):
                positions = len(sample["input_ids"]) - 1
                reference[row, :positions] = self.log_probs[index][:positions]
            per_token = torch.nn.functional.kl_div(log_q, reference, reduction="none", log_target=True).sum(-1)
            total = total + per_token[scored].sum()
            tokens += int(scored.sum())
        return total / max(tokens, 1)


class ClassifierKL:
    """KL(original ‖ model) of the class distributions of an image classifier on one dataset: the
    objective of :class:`ReferenceKL` for models that take ``pixel_values`` and give one row of
    class logits per image, with the same interface (``samples``, ``tokens``, :meth:`loss`), so
    ``rco`` and ``evopress`` search classifiers too.

    The original (``context.reference_model()``) runs over the samples once, on the device only
    for that, and its log-probabilities are kept (images x classes, float32, on the device). Each
    image is one scored position (``tokens`` is 1 per sample; a piece's length is ignored).
    :meth:`loss` runs the scored model in eval mode (batch norms on their running statistics,
    none updated), on the device where its parameters are.
    """

    def __init__(self, context: Context, data: str = "calibration", batch_size: int = 64) -> None:
        if data not in context.recipe.data:
            raise UserError(f"the KL objective reads data {data!r}, which the recipe's data: lacks")
        self.device = context.device
        self.samples = context.data(data)
        self.tokens = [1] * len(self.samples)
        reference = context.reference_model()
        with torch.no_grad(), onloaded(reference, self.device):
            self.log_probs = torch.cat(
                [
                    self._log_probs(reference, list(range(start, min(start + batch_size, len(self.samples)))))
                    for start in range(0, len(self.samples), batch_size)
                ]
            )

    def _log_probs(self, model: nn.Module, indices: list[int]) -> torch.Tensor:
        images = torch.stack([self.samples[i]["pixel_values"] for i in indices]).to(self.device)
        return torch.log_softmax(model(pixel_values=images).logits.float(), -1)

    def loss(self, model: nn.Module, pieces: Sequence[tuple[int, int | None]], batch_size: int = 8) -> torch.Tensor:
        """Mean per image of KL(original ‖ ``model``) over the images of ``pieces`` (sample index,
        ignored length), ``batch_size`` per forward pass; carries gradients when grad mode is on."""
        training = model.training
        model.eval()
        try:
            total = torch.zeros((), device=self.device)
            for start in range(0, len(pieces), batch_size):
                indices = [index for index, _ in pieces[start : start + batch_size]]
                log_q = self._log_probs(model, indices)
                reference = self.log_probs[indices]
                total = total + torch.nn.functional.kl_div(log_q, reference, reduction="sum", log_target=True)
        finally:
            model.train(training)
        return total / max(len(pieces), 1)


def reference_kl(context: Context, data: str = "calibration") -> ReferenceKL | ClassifierKL:
    """The KL-to-the-original objective that fits the model: :class:`ClassifierKL` when ``data``'s
    samples are images (``pixel_values``), else the next-token :class:`ReferenceKL`."""
    if data in context.recipe.data and "pixel_values" in context.data(data)[0]:
        return ClassifierKL(context, data)
    return ReferenceKL(context, data)
