"""The unlearning metrics, in a recipe's ``evaluate:`` and ``compress eval``: TOFU's, as open-unlearning
computes them (its ``configs/eval/tofu_metrics/`` and ``src/evals/metrics/``).

Each runs both models of the evaluation (the original, i.e. the model before unlearning, and
the result) on ``source: qa`` data (:mod:`compress_unlearn.data`) and reports both values.
Generation is greedy, at most ``max_new_tokens`` new tokens (open-unlearning's default 200),
stopping at the end-of-sequence token. The statistics themselves are in
:mod:`compress_unlearn.stats`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from compress.api import (
    DataSpec,
    MetricInputs,
    MetricParams,
    ModelMetric,
    Sample,
    UserError,
    collate,
    model_inputs,
    onloaded,
)
from compress_unlearn import stats
from compress_unlearn.data import IGNORE_INDEX, perturbed_count, variant


class QAParams(MetricParams):
    batch_size: int = Field(16, gt=0, description="sequences per forward pass")


class GenerationParams(QAParams):
    max_new_tokens: int = Field(200, gt=0, description="the most tokens generated per answer (greedy)")
    rouge: Literal["recall", "f1"] = Field("recall", description="ROUGE-L recall (TOFU) or F1 (MUSE)")


def refuse_unknown_entry(name: str, data: dict[str, DataSpec], key: str) -> None:
    if name not in data:
        raise UserError(f"{key}: names data entry {name!r}, which data: lacks", key)


def check_generation_fits(spec: DataSpec, params: GenerationParams, config: Any) -> None:
    """The longest prompt (``seq_len`` tokens at most) and ``max_new_tokens`` must fit the model's positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and spec.seq_len + params.max_new_tokens > positions:
        raise UserError(
            f"seq_len {spec.seq_len} + max_new_tokens {params.max_new_tokens} exceeds the model's {positions} "
            "positions (max_position_embeddings)",
            "max_new_tokens",
        )


def check_checkpoint(path: str | None, key: str) -> None:
    if path is not None and not (Path(path) / "config.json").is_file():
        raise UserError(f"{key}: {path!r} is not a checkpoint directory (no config.json)", key)


class QAMetric(ModelMetric):
    """Both models' value of :meth:`value` on the entry's data."""

    tasks: ClassVar[frozenset[str]] = frozenset({"causal-lm"})
    by_default: ClassVar[bool] = False  # reads qa data, some need parameters: only when named
    Params: ClassVar[type[MetricParams]] = QAParams
    params: QAParams

    def measure(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        results = {}
        for key, model in (("original", original), ("compressed", compressed)):
            with onloaded(model, inputs.device):
                results[key] = self.value(model.eval(), inputs)
        return results

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        raise NotImplementedError


# --- running the models ------------------------------------------------------------------


@torch.no_grad()
def forward_batches(model: nn.Module, samples: list[Sample], device: torch.device, batch_size: int):
    """``(logits, labels)`` of each batch of ``samples`` (only their ids and labels), on ``device``."""
    for start in range(0, len(samples), batch_size):
        chunk = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples[start : start + batch_size]]
        batch = {key: value.to(device) for key, value in collate(chunk, 0).items()}
        yield model(**model_inputs(batch)).logits, batch["labels"]


def answer_nll(model: nn.Module, samples: list[Sample], device: torch.device, batch_size: int) -> np.ndarray:
    """Each sample's average answer NLL."""
    values = []
    for logits, labels in forward_batches(model, samples, device, batch_size):
        values.extend(stats.average_nll(row) for row in stats.token_log_probs(logits, labels))
    return np.array(values)


def other_answers_nll(
    model: nn.Module, samples: list[Sample], device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The paraphrased answers' average NLL [N] and the perturbed answers' [N, K]."""
    count = perturbed_count(samples[0])
    if count == 0:
        raise UserError("the truth ratio needs perturbed_answer lists in the qa data")
    correct = answer_nll(model, [variant(s, None) for s in samples], device, batch_size)
    wrong = [answer_nll(model, [variant(s, i) for s in samples], device, batch_size) for i in range(count)]
    return correct, np.stack(wrong, axis=1)


def item_truth_ratios(model: nn.Module, samples: list[Sample], device: torch.device, batch_size: int) -> np.ndarray:
    return stats.truth_ratios(*other_answers_nll(model, samples, device, batch_size))


def teacher_forced(model: nn.Module, samples: list[Sample], device: torch.device, batch_size: int) -> list:
    hits = []
    for logits, labels in forward_batches(model, samples, device, batch_size):
        hits.extend(stats.teacher_forced_hits(logits, labels))
    return hits


@torch.no_grad()
def generate_answers(
    model: nn.Module, samples: list[Sample], tokenizer: Any, device: torch.device, params: GenerationParams
) -> list[str]:
    """Greedy answers to each sample's prompt (its tokens before the first label), left-padded batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(samples), params.batch_size):
        prompts = [prompt_ids(s) for s in samples[start : start + params.batch_size]]
        width = max(p.numel() for p in prompts)
        ids = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - prompt.numel() :] = prompt
            mask[row, width - prompt.numel() :] = 1
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return [answer.strip() for answer in answers]


def prompt_ids(sample: Sample) -> torch.Tensor:
    scored = (sample["labels"] != IGNORE_INDEX).nonzero()
    return sample["input_ids"][: int(scored[0])]


def reference_answers(samples: list[Sample], tokenizer: Any) -> list[str]:
    return [
        tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX], skip_special_tokens=True).strip() for s in samples
    ]


def rouge_scores(model: nn.Module, inputs: MetricInputs, params: GenerationParams) -> list[float]:
    if inputs.tokenizer is None:
        raise UserError("ROUGE decodes generated answers, and the model has no tokenizer")
    generated = generate_answers(model, inputs.samples, inputs.tokenizer, inputs.device, params)
    answers = reference_answers(inputs.samples, inputs.tokenizer)
    return [stats.rouge_l(g, a, params.rouge) for g, a in zip(generated, answers)]


def load_checkpoint(path: str, like: nn.Module) -> nn.Module:
    """A reference checkpoint directory (the retain model) in eval mode, sharing ``like``'s vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, theirs = like.get_output_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise UserError(f"the checkpoint's vocabulary has {theirs} tokens and the model's {ours}", path)
    return model


# --- the metrics -------------------------------------------------------------------------


class ProbabilityParams(QAParams):
    normalised: bool = Field(
        False, description="P_c / (P_c + Σ P_perturbed) instead of P_c (TOFU's real-author and world-fact splits)"
    )


class AnswerProbability(QAMetric):
    """Mean answer probability, exp(−average answer NLL) (TOFU's ``Q_A_Prob``); with ``normalised``
    the answer's share against the perturbed answers (``Q_A_Prob_normalised``)."""

    name = "answer_prob"
    Params = ProbabilityParams
    params: ProbabilityParams

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        correct = answer_nll(model, inputs.samples, inputs.device, self.params.batch_size)
        if not self.params.normalised:
            return float(np.mean(np.exp(-correct)))
        _, wrong = other_answers_nll(model, inputs.samples, inputs.device, self.params.batch_size)
        return stats.normalised_probability(correct, wrong)


class TruthRatioParams(QAParams):
    aggregator: Literal["closer_to_1_better", "true_better"] = Field(
        "closer_to_1_better",
        description="closer_to_1_better: mean min(R, 1/R) (forget data); true_better: mean max(0, 1 − R) (kept data)",
    )


class TruthRatio(QAMetric):
    """TOFU's truth ratio R = P(perturbed) / P(paraphrased) per item (geometric mean over the
    perturbed answers), aggregated as ``aggregator`` says."""

    name = "truth_ratio"
    Params = TruthRatioParams
    params: TruthRatioParams

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        ratios = item_truth_ratios(model, inputs.samples, inputs.device, self.params.batch_size)
        return stats.aggregate_truth_ratio(ratios, self.params.aggregator)


class ForgetQualityParams(QAParams):
    retain_model: str = Field(description="directory of the retain model (trained without the forget set)")


class ForgetQuality(QAMetric):
    """TOFU's forget quality: the KS-test p-value between the model's per-item truth ratios on the
    forget set and the retain model's (``ks_test`` over ``forget_truth_ratio``); near 1 = the
    model cannot be told from one never trained on the forget set."""

    name = "forget_quality"
    Params = ForgetQualityParams
    params: ForgetQualityParams

    def check(self, spec: DataSpec, data: dict[str, DataSpec], config: Any) -> None:
        check_checkpoint(self.params.retain_model, "retain_model")

    def prepare(self, inputs: MetricInputs, like: nn.Module) -> None:
        """The retain model's truth ratios on the data, the reference of every :meth:`value` after."""
        retain = load_checkpoint(self.params.retain_model, like)
        with onloaded(retain, inputs.device):
            self.reference = item_truth_ratios(retain, inputs.samples, inputs.device, self.params.batch_size)

    def measure(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        self.prepare(inputs, compressed)
        return super().measure(original, compressed, inputs)

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        ratios = item_truth_ratios(model, inputs.samples, inputs.device, self.params.batch_size)
        return stats.ks_pvalue(ratios, self.reference)


class AnswerRouge(QAMetric):
    """Mean ROUGE-L (recall by default, TOFU's ``Q_A_ROUGE``) of greedy answers against the true answers."""

    name = "answer_rouge"
    Params = GenerationParams
    params: GenerationParams

    def check(self, spec: DataSpec, data: dict[str, DataSpec], config: Any) -> None:
        check_generation_fits(spec, self.params, config)

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        return float(np.mean(rouge_scores(model, inputs, self.params)))


class ExtractionStrength(QAMetric):
    """Mean extraction strength (Carlini et al. 2021 as open-unlearning defines it): 1 − k*/L with k*
    the first answer position from which the teacher-forced argmax reproduces the whole rest."""

    name = "extraction_strength"

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        hits = teacher_forced(model, inputs.samples, inputs.device, self.params.batch_size)
        return float(np.mean([stats.extraction_strength(h) for h in hits]))


class ExactMemorization(QAMetric):
    """Verbatim memorization: the mean fraction of answer tokens the teacher-forced argmax reproduces
    (open-unlearning's ``exact_memorization``)."""

    name = "exact_memorization"

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        hits = teacher_forced(model, inputs.samples, inputs.device, self.params.batch_size)
        return float(np.mean([stats.exact_memorization(h) for h in hits]))


class PrivacyLeakParams(QAParams):
    holdout: str = Field(description="data entry of held-out items (same kind, never trained on)")
    k: float = Field(0.4, gt=0, le=1, description="Min-K%: the fraction of lowest token log-probabilities averaged")
    retain_model: str | None = Field(
        None, description="retain model directory whose AUC is the reference; unset = 0.5 (open-unlearning's fallback)"
    )


class PrivacyLeak(QAMetric):
    """TOFU's privleak: the Min-K% (k = 0.4) membership-inference AUC between the forget items and
    held-out items, relative to the retain model's AUC, in percent (0 = like the retain model;
    strongly negative = the forget items are still recognizable)."""

    name = "privacy_leak"
    Params = PrivacyLeakParams
    params: PrivacyLeakParams

    def check(self, spec: DataSpec, data: dict[str, DataSpec], config: Any) -> None:
        refuse_unknown_entry(self.params.holdout, data, "holdout")
        check_checkpoint(self.params.retain_model, "retain_model")

    def auc(self, model: nn.Module, forget: list[Sample], holdout: list[Sample], device: torch.device) -> float:
        scores = []
        for samples in (forget, holdout):
            values = []
            for logits, labels in forward_batches(model, samples, device, self.params.batch_size):
                values.extend(stats.min_k_score(row, self.params.k) for row in stats.token_log_probs(logits, labels))
            scores.append(values)
        return stats.membership_auc(*scores)

    def prepare(self, inputs: MetricInputs, like: nn.Module) -> None:
        """The held-out samples and the reference AUC (the retain model's, or 0.5) of every :meth:`value` after."""
        self.holdout = inputs.data(self.params.holdout)
        self.reference = 0.5
        if self.params.retain_model is not None:
            retain = load_checkpoint(self.params.retain_model, like)
            with onloaded(retain, inputs.device):
                self.reference = self.auc(retain, inputs.samples, self.holdout, inputs.device)

    def measure(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        self.prepare(inputs, compressed)
        return super().measure(original, compressed, inputs)

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        return stats.privacy_leak(self.auc(model, inputs.samples, self.holdout, inputs.device), self.reference)


class ModelUtilityParams(GenerationParams):
    general: list[str] = Field(
        default_factory=list,
        description="data entries of general knowledge (TOFU's real authors, world facts; qa records with "
        "perturbed answers), each adding its normalised probability, ROUGE-L and truth ratio",
    )


class ModelUtility(QAMetric):
    """TOFU's model utility: the harmonic mean of answer probability, ROUGE-L and truth ratio
    (``true_better``) on the entry's data (the retain set), and of normalised probability, ROUGE-L
    and truth ratio on each ``general`` entry."""

    name = "model_utility"
    Params = ModelUtilityParams
    params: ModelUtilityParams

    def check(self, spec: DataSpec, data: dict[str, DataSpec], config: Any) -> None:
        for name in self.params.general:
            refuse_unknown_entry(name, data, "general")
            check_generation_fits(data[name], self.params, config)
        check_generation_fits(spec, self.params, config)

    def value(self, model: nn.Module, inputs: MetricInputs) -> float:
        return self.combine(self.parts(model, inputs))

    @staticmethod
    def combine(parts: dict[str, float]) -> float:
        """The utility of :meth:`parts`: their harmonic mean."""
        return stats.harmonic_mean(list(parts.values()))

    def parts(self, model: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        """The statistics the utility is the harmonic mean of, keyed ``"{entry}/{statistic}"``: the
        entry's own data as ``data``, each ``general`` entry by its name; a utility near 0 has a
        part near 0, and this says which."""
        size = self.params.batch_size
        parts = {}
        for name in [None, *self.params.general]:
            part = inputs if name is None else replace(inputs, samples=inputs.data(name))
            correct = answer_nll(model, part.samples, part.device, size)
            paraphrased, wrong = other_answers_nll(model, part.samples, part.device, size)
            probability = np.mean(np.exp(-correct)) if name is None else stats.normalised_probability(correct, wrong)
            label = name or "data"
            parts[f"{label}/probability"] = float(probability)
            parts[f"{label}/rouge"] = float(np.mean(rouge_scores(model, part, self.params)))
            parts[f"{label}/truth_ratio"] = stats.aggregate_truth_ratio(
                stats.truth_ratios(paraphrased, wrong), "true_better"
            )
        return parts


METRICS: tuple[type[QAMetric], ...] = (
    AnswerProbability,
    TruthRatio,
    ForgetQuality,
    AnswerRouge,
    ExtractionStrength,
    ExactMemorization,
    PrivacyLeak,
    ModelUtility,
)
