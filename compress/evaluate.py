"""Evaluation: metrics that compare the compressed model with the original on the same data."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from compress.host import PluginHost
    from compress.recipe import DataSpec, MetricSpec


class Metric:
    """Accumulates over batches run through the original and the compressed model.

    Subclasses set ``name``, ``tasks`` (the model tasks they apply to) and a docstring,
    and implement ``update`` and ``result``.
    """

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]]

    def update(self, original: Any, compressed: Any, input_ids: torch.Tensor) -> None:
        """Take one batch: both models' outputs (``logits`` or ``last_hidden_state``)."""
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """``{"original": ..., "compressed": ...}`` or ``{"compressed": ...}`` for comparisons."""
        raise NotImplementedError


def next_token_log_probs(output: Any) -> torch.Tensor:
    """Log-probabilities of each position's next token, in float32, without the last position."""
    return F.log_softmax(output.logits[:, :-1].float(), dim=-1)


class Perplexity(Metric):
    """exp of the mean next-token negative log-likelihood over all evaluated tokens."""

    name = "perplexity"
    tasks = frozenset({"causal-lm"})

    def __init__(self) -> None:
        self.nll = {"original": 0.0, "compressed": 0.0}
        self.tokens = 0

    def update(self, original: Any, compressed: Any, input_ids: torch.Tensor) -> None:
        labels = input_ids[:, 1:].to(original.logits.device)
        for key, output in (("original", original), ("compressed", compressed)):
            log_probs = next_token_log_probs(output)
            self.nll[key] += -log_probs.gather(-1, labels.unsqueeze(-1)).sum().item()
        self.tokens += labels.numel()

    def result(self) -> dict[str, float]:
        return {key: math.exp(total / self.tokens) for key, total in self.nll.items()}


class KLDivergence(Metric):
    """Mean over tokens of KL(original || compressed) of the next-token distributions, in nats."""

    name = "kl"
    tasks = frozenset({"causal-lm"})

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def update(self, original: Any, compressed: Any, input_ids: torch.Tensor) -> None:
        p_log = next_token_log_probs(original)
        q_log = next_token_log_probs(compressed)
        per_token = (p_log.exp() * (p_log - q_log)).sum(-1)
        self.total += per_token.sum().item()
        self.tokens += per_token.numel()

    def result(self) -> dict[str, float]:
        return {"compressed": self.total / self.tokens}


class Top1Agreement(Metric):
    """Fraction of positions where both models predict the same most likely next token."""

    name = "top1"
    tasks = frozenset({"causal-lm"})

    def __init__(self) -> None:
        self.same = 0
        self.count = 0

    def update(self, original: Any, compressed: Any, input_ids: torch.Tensor) -> None:
        agree = original.logits.argmax(-1) == compressed.logits.argmax(-1)
        self.same += int(agree.sum())
        self.count += agree.numel()

    def result(self) -> dict[str, float]:
        return {"compressed": self.same / self.count}


class EmbeddingCosine(Metric):
    """Mean cosine similarity of the mean-pooled final hidden states (sentence embeddings)."""

    name = "cosine"
    tasks = frozenset({"encoder"})

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, original: Any, compressed: Any, input_ids: torch.Tensor) -> None:
        pooled = [out.last_hidden_state.float().mean(dim=1) for out in (original, compressed)]
        cosine = F.cosine_similarity(*pooled, dim=-1)
        self.total += cosine.sum().item()
        self.count += cosine.numel()

    def result(self) -> dict[str, float]:
        return {"compressed": self.total / self.count}


BUILTIN_METRICS: tuple[type[Metric], ...] = (Perplexity, KLDivergence, Top1Agreement, EmbeddingCosine)


@torch.no_grad()
def compare_models(
    original: nn.Module,
    compressed: nn.Module,
    sequences: list[torch.Tensor],
    metrics: list[Metric],
    device: torch.device,
    batch_size: int = 4,
) -> None:
    """Run both models over ``sequences`` batch by batch and feed every metric."""
    homes = [next(original.parameters()).device, next(compressed.parameters()).device]
    original.to(device)
    compressed.to(device)
    try:
        for start in tqdm(range(0, len(sequences), batch_size), desc="evaluate", unit="batch", leave=False):
            input_ids = torch.stack(sequences[start : start + batch_size]).to(device)
            reference_output = original(input_ids=input_ids)
            compressed_output = compressed(input_ids=input_ids)
            for metric in metrics:
                metric.update(reference_output, compressed_output, input_ids)
    finally:
        original.to(homes[0])
        compressed.to(homes[1])


def evaluate(
    host: PluginHost,
    original: nn.Module,
    compressed: nn.Module,
    metric_specs: list[MetricSpec],
    datasets: dict[str, tuple[DataSpec, list[torch.Tensor]]],
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Every metric on its dataset: ``{key: {original?, compressed, data, tokens, seq_len}}``.

    The key is the metric's name for the ``evaluation`` dataset and ``name:data`` for others,
    so one metric on several datasets (forget and retain sets) keeps every result.
    """
    metric_classes = host.metrics()
    results: dict[str, dict[str, Any]] = {}
    for data_name in dict.fromkeys(spec.data for spec in metric_specs):
        spec, sequences = datasets[data_name]
        metrics = [metric_classes[m.metric]() for m in metric_specs if m.data == data_name]
        compare_models(original, compressed, sequences, metrics, device)
        for metric in metrics:
            key = metric.name if data_name == "evaluation" else f"{metric.name}:{data_name}"
            results[key] = {
                **metric.result(),
                "data": str(spec.path),
                "tokens": len(sequences) * spec.seq_len,
                "seq_len": spec.seq_len,
            }
    return results
