"""How qa data renders a question and its answer: the model's chat template when it has one (so a
chat-tuned model answers what it knows), Question:/Answer: otherwise, and a template that renders
the question differently once an answer follows it refused."""

from __future__ import annotations

import pytest
import torch

from compress.errors import UserError
from compress.recipe import DataSpec
from compress_unlearn.data import IGNORE_INDEX, QASource
from compress_unlearn.metrics import GenerationParams, generate_answers, prompt_ids, reference_answers
from tests.faults.cases_unlearn import ANSWER_DEPENDENT_TEMPLATE
from tests.plugins.unlearn.conftest import qa_entry


def facts(qa_data, tokenizer, samples: int = 2) -> list[dict]:
    return QASource().load(DataSpec(**qa_entry(qa_data / "world_facts.jsonl", samples)), tokenizer)


def answer_ids(sample) -> list[int]:
    return sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_a_chat_model_gets_its_template_and_only_the_assistant_turn_is_labelled(qa_data, tokenizer):
    sample = facts(qa_data, tokenizer, 1)[0]
    question = "What is the capital of France?"
    user = [{"role": "user", "content": question}]
    expected_prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(prompt_ids(sample)) == expected_prompt
    assert tokenizer.decode(answer_ids(sample)) == f"The capital of France is Paris.{tokenizer.eos_token}"
    whole = [*user, {"role": "assistant", "content": "The capital of France is Paris."}]
    assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(whole, tokenize=False).rstrip()
    for key in ("paraphrased_input_ids", "perturbed_0_input_ids"):
        assert tokenizer.decode(sample[key]).startswith(expected_prompt)


def test_the_chat_tuned_model_answers_world_facts_it_knows(qa_data, smollm2_dir, tokenizer):
    """SmolLM2-135M-Instruct answered the plain template with an empty turn, which made model
    utility's world-facts ROUGE 0 for every model; in its own template it answers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    samples = facts(qa_data, tokenizer, 2)
    params = GenerationParams(max_new_tokens=12, batch_size=2)
    generated = generate_answers(model, samples, tokenizer, torch.device("cpu"), params)
    assert (
        generated
        == reference_answers(samples, tokenizer)
        == [
            "The capital of France is Paris.",
            "The capital of Germany is Berlin.",
        ]
    )


def test_without_a_chat_template_the_plain_template_ends_with_end_of_sequence(qa_data, tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    sample = facts(qa_data, plain, 1)[0]
    assert plain.decode(prompt_ids(sample)) == "Question: What is the capital of France?\nAnswer:"
    answer = plain(" The capital of France is Paris.", add_special_tokens=False).input_ids
    assert answer_ids(sample) == [*answer, plain.eos_token_id]


def test_a_template_that_renders_the_question_differently_once_answered_is_refused(qa_data, tokenizer):
    odd = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    odd.chat_template = ANSWER_DEPENDENT_TEMPLATE
    with pytest.raises(UserError, match="renders the question differently once an answer follows it") as refused:
        facts(qa_data, odd, 1)
    assert "world_facts.jsonl:1" in str(refused.value)
