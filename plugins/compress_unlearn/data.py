"""TOFU-style question/answer data: the ``qa`` data source, and the forget/retain overlap count.

A record is a JSON object as in TOFU's ``*_perturbed`` splits (``locuslab/TOFU``):
``question``, ``answer``, and for evaluation ``paraphrased_answer`` (a correct answer in other
words) and ``perturbed_answer`` (a list of wrong answers). A sample renders the question as the
user's turn of the model's chat template and the answer as the assistant's, as open-unlearning
does; only the answer and the template's end of turn are labels. A tokenizer without a chat
template gets ``"Question: {question}\\nAnswer: {answer}"`` and its end-of-sequence token. A
chat-tuned model given that plain template instead answers with an empty turn whatever it was not
fine-tuned on (SmolLM2-135M-Instruct: 39 of 40 world facts), which would make model utility's
general-knowledge ROUGE 0 for every model.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from compress.api import DataSpec, JsonLinesSource, Sample, UserError, records

IGNORE_INDEX = -100
QUESTION, ANSWER = "question", "answer"
PARAPHRASED, PERTURBED = "paraphrased_answer", "perturbed_answer"


def prompt_text(question: str, tokenizer: Any) -> str:
    """What generation starts from: the chat template's user turn and the assistant's header;
    ``Question: …\\nAnswer:`` without a chat template."""
    if not has_chat_template(tokenizer):
        return f"Question: {question}\nAnswer:"
    return tokenizer.apply_chat_template([user_turn(question)], tokenize=False, add_generation_prompt=True)


def answer_text(question: str, answer: str, prompt: str, tokenizer: Any, where: Any) -> str:
    """What follows ``prompt`` (:func:`prompt_text`) and is labelled: the assistant turn up to its
    end-of-turn token (the whitespace after it is no label); without a chat template the answer
    after a space, and :meth:`QASource.sequences` adds the end-of-sequence token."""
    if not has_chat_template(tokenizer):
        return f" {answer}"
    chat = tokenizer.apply_chat_template(
        [user_turn(question), {"role": "assistant", "content": answer}], tokenize=False
    )
    if not chat.startswith(prompt):
        raise UserError("the chat template renders the question differently once an answer follows it", where)
    return chat[len(prompt) :].rstrip()


def user_turn(question: str) -> dict[str, str]:
    return {"role": "user", "content": question}


def has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def variant_keys(index: int | None) -> tuple[str, str]:
    """The sample keys of a variant's ids and labels: the paraphrase (``None``) or perturbed answer ``index``."""
    name = "paraphrased" if index is None else f"perturbed_{index}"
    return f"{name}_input_ids", f"{name}_labels"


class QASource(JsonLinesSource):
    """TOFU-style question/answer records (``question``, ``answer``; other keys through
    ``prompt_field``/``answer_field``) rendered by :func:`prompt_text` and :func:`answer_text`; only answers are labels
    (``loss_on: answers``). A record's ``paraphrased_answer`` and ``perturbed_answer`` list, when
    present, ride along as extras (``paraphrased_input_ids``/``_labels``,
    ``perturbed_<i>_input_ids``/``_labels``) for the truth ratio; every record of a file then needs
    the same number of them."""

    name = "qa"

    def check(self, spec: DataSpec) -> None:
        if spec.loss_on != "answers":
            raise UserError("qa data scores answers only: set loss_on: answers", "loss_on")
        if spec.field is not None:
            raise UserError("qa data has no field; name other keys with prompt_field and answer_field", "field")
        question, answer = self.fields(spec)
        super().check(spec.model_copy(update={"prompt_field": question, "answer_field": answer}))

    def fields(self, spec: DataSpec) -> tuple[str, str]:
        return spec.prompt_field or QUESTION, spec.answer_field or ANSWER

    def texts(self, record: dict, spec: DataSpec, where: Any) -> tuple[str, str]:
        """The record's question and answer."""
        question, answer = self.fields(spec)
        return text(record, question, where), text(record, answer, where)

    def check_record(self, record: dict, spec: DataSpec, where: Any) -> None:
        self.texts(record, spec, where)
        self.variants(record, where)

    def variants(self, record: dict, where: Any) -> list[tuple[int | None, str]]:
        """The record's other answers: ``(None, paraphrase)`` and ``(i, perturbed answer i)``."""
        found: list[tuple[int | None, str]] = []
        if PARAPHRASED in record:
            found.append((None, text(record, PARAPHRASED, where)))
        if PERTURBED in record:
            wrong = record[PERTURBED]
            if not isinstance(wrong, list) or not wrong or not all(isinstance(item, str) for item in wrong):
                raise UserError(f"{PERTURBED!r}: expected a non-empty list of texts", where)
            found.extend(enumerate(wrong))
        return found

    def sequences(
        self, question: str, answers: list[str], spec: DataSpec, tokenizer: Any, where: Any
    ) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of the question with each of ``answers`` (the prompt rendered and
        encoded once), cut to ``seq_len``; UserError when no answer token is left."""
        prompt = prompt_text(question, tokenizer)
        prompt_ids = encode(prompt, tokenizer)
        end = (
            [tokenizer.eos_token_id] if not has_chat_template(tokenizer) and tokenizer.eos_token_id is not None else []
        )
        found = []
        for answer in answers:
            answer_ids = encode(answer_text(question, answer, prompt, tokenizer, where), tokenizer) + end
            ids = (prompt_ids + answer_ids)[: spec.seq_len]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: spec.seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                raise UserError(f"no answer token within the first seq_len = {spec.seq_len} tokens", where)
            found.append((ids, labels))
        return found

    def tokenize(self, record: dict, spec: DataSpec, tokenizer: Any, where: Any) -> tuple[list[int], list[int]]:
        question, answer = self.texts(record, spec, where)
        return self.sequences(question, [answer], spec, tokenizer, where)[0]

    def load(self, spec: DataSpec, tokenizer: Any) -> list[Sample]:
        self.check(spec)
        if tokenizer is None:
            raise UserError("qa data needs a tokenizer, and the model has none", str(spec.path))
        samples: list[Sample] = []
        shape = None
        for where, record in records(spec):
            question, answer = self.texts(record, spec, where)
            variants = self.variants(record, where)
            if shape is None:
                shape = [index for index, _ in variants]
            elif [index for index, _ in variants] != shape:
                raise UserError(
                    f"the record's paraphrased/perturbed answers differ in kind or number from the first record's "
                    f"({len(shape)} in all)",
                    where,
                )
            answers = [answer, *(other for _, other in variants)]
            (ids, labels), *others = self.sequences(question, answers, spec, tokenizer, where)
            sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
            for (index, _), (ids, labels) in zip(variants, others, strict=True):
                ids_key, labels_key = variant_keys(index)
                sample[ids_key], sample[labels_key] = torch.tensor(ids), torch.tensor(labels)
            samples.append(sample)
        return samples


def text(record: dict, key: str, where: Any) -> str:
    if key not in record:
        raise UserError(f"the record has no {key!r} (it has {', '.join(map(repr, record)) or 'no keys'})", where)
    value = record[key]
    if not isinstance(value, str):
        raise UserError(f"{key!r}: expected text, found {type(value).__name__}", where)
    return value


def encode(value: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(value, add_special_tokens=False).input_ids)


def variant(sample: Sample, index: int | None) -> Sample:
    """The sample with a paraphrased (``None``) or perturbed answer in place of its answer."""
    ids_key, labels_key = variant_keys(index)
    if ids_key not in sample:
        raise UserError(
            f"the data has no {PARAPHRASED if index is None else PERTURBED} (use source: qa records with it)"
        )
    return {"input_ids": sample[ids_key], "labels": sample[labels_key]}


def perturbed_count(sample: Sample) -> int:
    """How many perturbed answers the sample carries."""
    return sum(1 for key in sample if key.startswith("perturbed_") and key.endswith("_input_ids"))


ITEM_FIELDS = {"jsonl": ("text",), "chat": ("messages",), "qa": (QUESTION, ANSWER)}
"""The record keys that identify an item, by data source (unless the entry names its own)."""


def item_fields(spec: DataSpec) -> tuple[str, ...] | None:
    if spec.source not in ITEM_FIELDS:
        return None
    if spec.prompt_field is not None:
        return spec.prompt_field, spec.answer_field
    return (spec.field,) if spec.field else ITEM_FIELDS[spec.source]


def overlapping_items(forget: DataSpec, retain: DataSpec) -> tuple[int, str]:
    """How many of the forget set's items (the first ``samples`` records) are retain items too, and where
    the first is (``file:line = file:line``); ``(0, "")`` for data without records (text files)."""
    fields = item_fields(forget), item_fields(retain)
    if None in fields or forget.source != retain.source or not (forget.path.is_file() and retain.path.is_file()):
        return 0, ""  # a missing file is refused by the data checks
    kept: dict[str, str] = {}
    for where, record in records(retain):
        kept.setdefault(item_key(record, fields[1]), str(where))
    shared, first = 0, ""
    for where, record in records(forget):
        key = item_key(record, fields[0])
        if key in kept:
            shared += 1
            first = first or f"{where} = {kept[key]}"
    return shared, first


def item_key(record: dict, fields: tuple[str, ...]) -> str:
    return json.dumps([record.get(name) for name in fields], sort_keys=True)
