"""Evaluation: metrics that compare the compressed model with the original on the same data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from compress.data import IGNORE_INDEX, Batch, Sample, collate, model_inputs
from compress.errors import UserError
from compress.sample_data import label as sample_label

if TYPE_CHECKING:
    from compress.host import PluginHost
    from compress.recipe import DataSpec, MetricSpec


class MetricParams(BaseModel):
    """Parameters of a metric (the keys of its ``evaluate:`` entry besides ``metric`` and ``data``);
    subclass it and describe every field."""

    model_config = ConfigDict(extra="forbid")


class Metric:
    """Accumulates over batches run through the original and the compressed model.

    Subclasses set ``name``, ``tasks`` (the model tasks they apply to), optionally ``Params``
    (validated from the recipe entry, refused at ``compress recipe check`` when wrong) and a
    docstring, and implement ``update`` and ``result``.
    """

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]]
    Params: ClassVar[type[MetricParams]] = MetricParams
    reads_data: ClassVar[bool] = True
    """False for a metric that brings its own data (lm-eval tasks): its entry needs no ``data:`` entry."""
    by_default: ClassVar[bool] = True
    """Whether ``compress eval`` without ``--metric`` runs it; False for metrics that need parameters
    or data of a particular shape (unlearning's forget quality needs the retain model's)."""

    def __init__(self, params: MetricParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def check(self, spec: DataSpec, data: dict[str, DataSpec], config: Any) -> None:
        """Raise UserError for an ``evaluate:`` entry that cannot run on this recipe (``spec`` the
        data it reads, ``data`` every ``data:`` entry, ``config`` the model's), at ``compress recipe
        check``; ``where`` names the offending key of the entry. The default accepts every entry."""

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        """Take one batch: both models' outputs (``logits`` or ``last_hidden_state``) and the
        :data:`compress.data.Batch` they ran on, on the models' device."""
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """``{"original": ..., "compressed": ...}`` or ``{"compressed": ...}`` for comparisons."""
        raise NotImplementedError


@dataclass
class MetricInputs:
    """What a :class:`ModelMetric` reads besides the two models."""

    samples: list[Sample]
    """The samples of the entry's ``data:``, with the source's extras."""
    spec: DataSpec
    tokenizer: Any
    device: torch.device
    data: Callable[[str], list[Sample]]
    """Another ``data:`` entry's samples by name (UserError where there is none, as in ``compress eval``)."""


class ModelMetric(Metric):
    """A metric that runs the models itself: generation, several sequences per item (a
    truth ratio), other data entries or checkpoints. It implements :meth:`measure` instead of
    ``update`` and ``result``; the models are on the host when it is called."""

    def measure(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        """``{"original": ..., "compressed": ...}`` or ``{"compressed": ...}``, as :meth:`Metric.result`."""
        raise NotImplementedError

    def rows(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, dict[str, Any]]:
        """Several results of one entry, ``{row: values}``: each is reported under the entry's key
        followed by ``/row`` (e.g. ``lm_eval/arc_easy/acc``), and its values may replace the
        report's ``data``, ``samples`` and ``tokens``. The default: :meth:`measure`'s one, unnamed."""
        return {"": self.measure(original, compressed, inputs)}


def next_token_log_probs(output: Any) -> torch.Tensor:
    """Log-probabilities of each position's next token, in float32, without the last position."""
    return F.log_softmax(output.logits[:, :-1].float(), dim=-1)


def sequence_logits(output: Any) -> Iterator[torch.Tensor]:
    """Each sequence's next-token logits in float32, ``[seq - 1, vocab]``, one sequence at a time:
    contiguous rows for the softmax, and float32 copies one sequence large, not the batch's (a
    4 × 512 batch over a 49k vocabulary is 400 MB a copy)."""
    for logits in output.logits:
        yield logits[:-1].float()


def next_token_labels(batch: Batch) -> torch.Tensor:
    """Each position's next-token label (the batch's labels shifted left); :data:`IGNORE_INDEX`
    where no token is scored (padding, prompts when only answers are)."""
    return batch["labels"][:, 1:]


class Perplexity(Metric):
    """exp of the mean next-token negative log-likelihood over the labelled tokens."""

    name = "perplexity"
    tasks = frozenset({"causal-lm"})

    def __init__(self, params: MetricParams | None = None) -> None:
        super().__init__(params)
        self.nll = {"original": 0.0, "compressed": 0.0}
        self.tokens = 0

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        labels = next_token_labels(batch)
        for key, output in (("original", original), ("compressed", compressed)):
            sums = [
                F.cross_entropy(logits, row, reduction="sum")
                for logits, row in zip(sequence_logits(output), labels, strict=True)
            ]
            self.nll[key] += torch.stack(sums).sum().item()
        self.tokens += int((labels != IGNORE_INDEX).sum())

    def result(self) -> dict[str, float]:
        return {key: math.exp(total / self.tokens) for key, total in self.nll.items()}


class KLDivergence(Metric):
    """Mean over labelled tokens of KL(original || compressed) of the next-token distributions, in nats."""

    name = "kl"
    tasks = frozenset({"causal-lm"})

    def __init__(self, params: MetricParams | None = None) -> None:
        super().__init__(params)
        self.total = 0.0
        self.tokens = 0

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        scored = next_token_labels(batch) != IGNORE_INDEX
        sums = []
        for p, q, row in zip(sequence_logits(original), sequence_logits(compressed), scored, strict=True):
            p_log, q_log = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
            sums.append(F.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1)[row].sum())
        self.total += torch.stack(sums).sum().item()
        self.tokens += int(scored.sum())

    def result(self) -> dict[str, float]:
        return {"compressed": self.total / self.tokens}


class TopKParams(MetricParams):
    k: int = Field(1, gt=0, description="agreement when the original's top token is among the compressed model's k")


class Top1Agreement(Metric):
    """Fraction of labelled positions where the original model's most likely next token is the
    compressed model's most likely one (with ``k``: among its ``k`` most likely)."""

    name = "top1"
    tasks = frozenset({"causal-lm"})
    Params = TopKParams
    params: TopKParams

    def __init__(self, params: TopKParams | None = None) -> None:
        super().__init__(params)
        self.same = 0
        self.count = 0

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        scored = next_token_labels(batch) != IGNORE_INDEX
        best = original.logits[:, :-1].argmax(-1, keepdim=True)
        candidates = compressed.logits[:, :-1].topk(self.params.k, dim=-1).indices
        agree = (candidates == best).any(-1)
        self.same += int(agree[scored].sum())
        self.count += int(scored.sum())

    def result(self) -> dict[str, float]:
        return {"compressed": self.same / self.count}


class EmbeddingCosine(Metric):
    """Mean cosine similarity of the mean-pooled final hidden states (sentence embeddings), padding excluded."""

    name = "cosine"
    tasks = frozenset({"encoder"})

    def __init__(self, params: MetricParams | None = None) -> None:
        super().__init__(params)
        self.total = 0.0
        self.count = 0

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [(out.last_hidden_state.float() * mask).sum(1) / mask.sum(1) for out in (original, compressed)]
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
    samples: list[Sample],
    metrics: list[Metric],
    device: torch.device,
    batch_size: int = 4,
) -> None:
    """Run both models over ``samples``, ``batch_size`` at a time through :func:`compress.data.collate`,
    and feed every metric.

    Padding is masked (``attention_mask``) and unlabelled, so the value of the pad token does
    not matter: a batch gives what its samples give one at a time.
    """
    homes = [next(original.parameters()).device, next(compressed.parameters()).device]
    original.to(device)
    compressed.to(device)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", unit="batch", leave=False):
            batch = {key: value.to(device) for key, value in collate(samples[start : start + batch_size], 0).items()}
            reference_output = original(**model_inputs(batch))
            compressed_output = compressed(**model_inputs(batch))
            for metric in metrics:
                metric.update(reference_output, compressed_output, batch)
    finally:
        original.to(homes[0])
        compressed.to(homes[1])


def metric_key(spec: MetricSpec) -> str:
    """The report's key of an ``evaluate:`` entry: ``name``, ``name(k=5)`` with parameters,
    and ``:data`` appended for data other than ``evaluation``."""
    key = spec.metric
    if spec.params:
        key += "(" + ", ".join(f"{name}={value}" for name, value in spec.params.items()) + ")"
    return key if spec.data == "evaluation" else f"{key}:{spec.data}"


def evaluate(
    host: PluginHost,
    original: nn.Module,
    compressed: nn.Module,
    metric_specs: list[MetricSpec],
    datasets: dict[str, tuple[DataSpec, list[Sample]]],
    device: torch.device,
    tokenizer: Any = None,
    data: Callable[[str], list[Sample]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every metric on its dataset: ``{key: {original?, compressed, data, samples, tokens, seq_len}}``.

    The key is :func:`metric_key`, so one metric on several datasets (forget and retain sets)
    or with several parameter sets keeps every result. ``tokens`` counts the real (unpadded)
    input tokens. A :class:`ModelMetric` gets ``tokenizer`` and ``data`` (another entry's
    samples by name) in its :class:`MetricInputs`.
    """
    metric_classes = host.metrics()
    results: dict[str, dict[str, Any]] = {}
    for data_name in dict.fromkeys(spec.data for spec in metric_specs):
        spec, samples = datasets.get(data_name, (None, []))  # absent: read by no metric (Metric.reads_data)
        entries = [m for m in metric_specs if m.data == data_name]
        metrics = []
        for entry in entries:
            metric_class = metric_classes[entry.metric]
            metrics.append(metric_class(metric_class.Params.model_validate(entry.params)))
        streamed = [metric for metric in metrics if not isinstance(metric, ModelMetric)]
        if streamed:
            compare_models(original, compressed, samples, streamed, device)
        inputs = MetricInputs(samples, spec, tokenizer, device, data or no_other_data)
        tokens = sum(sample["input_ids"].numel() for sample in samples if "input_ids" in sample)
        for entry, metric in zip(entries, metrics):
            rows = (
                metric.rows(original, compressed, inputs) if isinstance(metric, ModelMetric) else {"": metric.result()}
            )
            # a metric without data: entry names its rows itself (lm_eval/arc_easy/acc)
            key = metric_key(entry) if metric.reads_data else entry.metric
            for row, values in rows.items():
                results[key + (f"/{row}" if row else "")] = {
                    "data": sample_label(spec.path) if spec else "",
                    "samples": len(samples),
                    "tokens": tokens,
                    "seq_len": spec.seq_len if spec else None,
                    **values,
                }
    return results


def no_other_data(name: str) -> list[Sample]:
    raise UserError(f"this metric reads the data entry {name!r}, and only a recipe's evaluate: has data: entries")
