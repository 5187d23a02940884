"""Bad unlearning recipes (the unlearn plugin): each refused in one line, exit 2, nothing written;
all but the reference model's vocabulary at ``compress recipe check``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import Fault, copy_tiny_model, recipe_argv, tiny_model, write_recipe

QUESTIONS = [f"Where was author number {i} born?" for i in range(6)]


def qa_lines(questions: list[str], answer: str = "In a small town by the sea.") -> bytes:
    return "".join(json.dumps({"question": q, "answer": answer}) + "\n" for q in questions).encode()


def qa(path: str, samples: int, **extra: Any) -> dict:
    return {"path": path, "source": "qa", "samples": samples, "seq_len": 64, "loss_on": "answers", **extra}


def unlearn_setup(
    stage: dict | None = None,
    forget: bytes = qa_lines(QUESTIONS[:2]),
    retain: bytes = qa_lines(QUESTIONS[2:]),
    data: dict | None = None,
    evaluate: list | None = None,
    command: str = "check",
    prepare: Callable[[Path], dict] | None = None,
    model: Callable[[Path], Path] | None = None,
) -> Callable[[Path], list[str]]:
    """A setup writing forget.jsonl and retain.jsonl and an npo recipe over them (``stage`` keys
    replace the stage's, ``data`` entries the two (None removes one), ``prepare(work)`` adds stage
    keys, ``model(work)`` makes the model the recipe reads instead of the tiny one)."""

    def setup(work: Path) -> list[str]:
        (work / "forget.jsonl").write_bytes(forget)
        (work / "retain.jsonl").write_bytes(retain)
        entries = {"forget": qa("forget.jsonl", 2), "retain": qa("retain.jsonl", 2), **(data or {})}
        entries = {name: entry for name, entry in entries.items() if entry is not None}
        method = {"method": "npo", "steps": 1, "batch_size": 2, **(stage or {}), **(prepare(work) if prepare else {})}
        chosen = {"model": str(model(work))} if model else {}
        write_recipe(work, data=entries, stages=[method], evaluate=evaluate or [], **chosen)
        return recipe_argv(command)

    return setup


def other_vocabulary(work: Path) -> dict:
    """A reference model like the tiny one but with a vocabulary of 300 tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model())
    config.vocab_size = 300
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "reference")
    return {"reference": str(work / "reference")}


ANSWER_DEPENDENT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if messages|length == 1 %}(unanswered) {% endif %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A chat template that renders a lone question differently from one that an answer follows."""


def answer_dependent_template(model: Path) -> None:
    """Give the model's tokenizer :data:`ANSWER_DEPENDENT_TEMPLATE`."""
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = ANSWER_DEPENDENT_TEMPLATE
    config_path.write_text(json.dumps(config), encoding="utf-8")


CASES = [
    Fault(
        id="unlearn/forget-retain-overlap",
        description="forget and retain sets sharing items (the count and the first pair are named)",
        setup=unlearn_setup(retain=qa_lines(QUESTIONS[1:])),
        message="the forget and retain sets share 1 item(s) (first: forget.jsonl:2 = retain.jsonl:1)",
        place="recipe.yaml:",
    ),
    Fault(
        id="unlearn/forget-no-answer-tokens",
        description="a forget set whose answers are empty, so that no token is left after prompt masking",
        setup=unlearn_setup(
            forget=b"".join(json.dumps({"q": f"question {i}?", "a": ""}).encode() + b"\n" for i in range(2)),
            data={"forget": {**qa("forget.jsonl", 2), "source": "jsonl", "prompt_field": "q", "answer_field": "a"}},
        ),
        message="no answer token within the first seq_len = 64 tokens",
        place="forget.jsonl:1",
    ),
    Fault(
        id="unlearn/chat-template-depends-on-answer",
        description="qa data for a model whose chat template renders a question differently once answered",
        setup=unlearn_setup(model=lambda work: copy_tiny_model(work, damage=answer_dependent_template)),
        message="the chat template renders the question differently once an answer follows it",
        place="forget.jsonl:1",
    ),
    Fault(
        id="unlearn/missing-retain",
        description="an unlearning stage without a `retain:` data entry",
        setup=unlearn_setup(data={"retain": None}),
        message="reads data: retain:, which the recipe lacks",
    ),
    Fault(
        id="unlearn/npo-beta-zero",
        description="npo with `beta: 0` (the loss divides by β)",
        setup=unlearn_setup({"beta": 0}),
        message="greater than 0",
        place="beta",
    ),
    Fault(
        id="unlearn/simnpo-negative-delta",
        description="simnpo with a negative margin `delta: -1`",
        setup=unlearn_setup({"method": "simnpo", "delta": -1}),
        message="greater than or equal to 0",
        place="delta",
    ),
    Fault(
        id="unlearn/reference-other-vocabulary",
        description="npo whose `reference:` model has another vocabulary (300 tokens, the model 257)",
        setup=unlearn_setup(command="apply", prepare=other_vocabulary),
        message="the reference model's vocabulary has 300 tokens and the model's",
        place="stage npo: reference",
        must_not_exist=("out",),
    ),
    Fault(
        id="unlearn/generation-beyond-context",
        description="answer_rouge with `max_new_tokens: 1000` on a model of 256 positions",
        setup=unlearn_setup(evaluate=[{"metric": "answer_rouge", "data": "forget", "max_new_tokens": 1000}]),
        message="seq_len 64 + max_new_tokens 1000 exceeds the model's 256 positions",
        place="recipe.yaml:",
    ),
    Fault(
        id="unlearn/retain-model-not-a-checkpoint",
        description="forget_quality whose `retain_model:` is not a checkpoint directory",
        setup=unlearn_setup(evaluate=[{"metric": "forget_quality", "data": "forget", "retain_model": "nowhere"}]),
        message="retain_model: 'nowhere' is not a checkpoint directory (no config.json)",
        place="recipe.yaml:",
    ),
    Fault(
        id="unlearn/privacy-leak-unknown-holdout",
        description="privacy_leak naming a `holdout:` entry that data: lacks",
        setup=unlearn_setup(evaluate=[{"metric": "privacy_leak", "data": "forget", "holdout": "heldout"}]),
        message="holdout: names data entry 'heldout', which data: lacks",
        place="recipe.yaml:",
    ),
    Fault(
        id="unlearn/uoe-dense-model",
        description="`uoe` (one expert of a mixture-of-experts model) on a dense model",
        setup=unlearn_setup(stage={"method": "uoe"}),
        message="no router: uoe unlearns one expert of a mixture-of-experts layer and LlamaMLP has none",
        place="model.layers.0.mlp",
    ),
    Fault(
        id="unlearn/dmm-text-data",
        description="`dmm` (datamodel matching, for image classifiers) on `source: qa` forget and retain sets",
        setup=unlearn_setup(stage={"method": "dmm"}),
        message="dmm attributes an image classifier's logits, but data: forget: has source 'qa'",
    ),
    Fault(
        id="unlearn/dmm-unknown-kernel-data",
        description="`dmm` whose `kernel_data:` names an entry that data: lacks",
        setup=unlearn_setup(stage={"method": "dmm", "kernel_data": "train"}),
        message="kernel_data: names data entry 'train', which data: lacks",
        place="recipe.yaml:",
    ),
]
