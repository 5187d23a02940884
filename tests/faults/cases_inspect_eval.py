"""``compress inspect`` and ``compress eval`` on garbage: not a checkpoint, a bad config.json,
no Linear weights, out-of-range options (refused at option parsing, before any model loads)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.faults.cases_models import config_bytes, remote_code
from tests.faults.harness import Fault, copy_tiny_model, tiny_model, tiny_text


def inspect_of(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    """A setup running ``compress inspect`` on what ``make(work)`` returns."""

    def setup(work: Path) -> list[str]:
        return ["inspect", str(make(work).relative_to(work))]

    return setup


def damaged_model(damage: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A maker of the tiny model's copy at ``work/model`` after ``damage``."""
    return partial(copy_tiny_model, damage=damage)


def only_embeddings(model: Path) -> None:
    """Keep the embedding table only: no Linear layer has a weight stored."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    save_file({"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}, model / "model.safetensors")


def no_safetensors(model: Path) -> None:
    (model / "model.safetensors").unlink()


def missing(work: Path) -> Path:
    return work / "no-such-checkpoint"


def a_file(work: Path) -> Path:
    (work / "model.safetensors").write_bytes(b"\0" * 16)
    return work / "model.safetensors"


def empty_directory(work: Path) -> Path:
    (work / "empty").mkdir()
    return work / "empty"


def eval_of(*options: str, checkpoint: Callable[[Path], Path] | None = None) -> Callable[[Path], list[str]]:
    """A setup running ``compress eval`` of ``checkpoint(work)`` (default: the tiny model) against the tiny model."""

    def setup(work: Path) -> list[str]:
        target = str(checkpoint(work)) if checkpoint is not None else str(tiny_model())
        return ["eval", target, "--against", str(tiny_model()), "--data", str(tiny_text()), *options]

    return setup


CASES = [
    Fault(
        id="inspect/missing-directory",
        description="`compress inspect` of a path that does not exist",
        setup=inspect_of(missing),
        message="no such checkpoint directory",
        place="no-such-checkpoint",
    ),
    Fault(
        id="inspect/a-file",
        description="`compress inspect` of a file (model.safetensors) instead of its directory",
        setup=inspect_of(a_file),
        message="a file, not a checkpoint directory",
        place="model.safetensors",
    ),
    Fault(
        id="inspect/empty-directory",
        description="`compress inspect` of an empty directory",
        setup=inspect_of(empty_directory),
        message="no config.json",
        place="empty",
    ),
    Fault(
        id="inspect/config-empty",
        description="`compress inspect` of a checkpoint whose config.json is empty",
        setup=inspect_of(damaged_model(config_bytes(b""))),
        message="config.json is empty",
        place="model/config.json",
    ),
    Fault(
        id="inspect/config-invalid-json",
        description="`compress inspect` of a checkpoint whose config.json is `{not json`",
        setup=inspect_of(damaged_model(config_bytes(b"{not json"))),
        message="config.json is not valid JSON",
        place="model/config.json:1:2",
    ),
    Fault(
        id="inspect/config-json-string",
        description='`compress inspect` of a checkpoint whose config.json is `"llama"`',
        setup=inspect_of(damaged_model(config_bytes(b'"llama"'))),
        message="config.json holds a JSON str, not an object",
        place="model/config.json",
    ),
    Fault(
        id="inspect/quantization-config-not-object",
        description='`compress inspect` of a checkpoint whose `quantization_config` is `"int4"`',
        setup=inspect_of(damaged_model(config_bytes(b'{"model_type": "llama", "quantization_config": "int4"}'))),
        message="quantization_config is not an object",
        place="model/config.json",
    ),
    Fault(
        id="inspect/no-linear-weights",
        description="`compress inspect` of a checkpoint whose safetensors hold only the embedding table",
        setup=inspect_of(damaged_model(only_embeddings)),
        message="no weights of config.json's Linear layers",
        place="model",
    ),
    Fault(
        id="inspect/no-safetensors",
        description="`compress inspect` of a checkpoint without weights",
        setup=inspect_of(damaged_model(no_safetensors)),
        message="no .safetensors weights",
        place="model",
    ),
    Fault(
        id="inspect/remote-code",
        description="`compress inspect` of a checkpoint whose architecture is custom code (`auto_map`)",
        setup=inspect_of(damaged_model(remote_code)),
        message="trust_remote_code",
        place="model",
    ),
    Fault(
        id="eval/samples-zero",
        description="`compress eval --samples 0`",
        setup=eval_of("--samples", "0"),
        message="Invalid value for '--samples': 0 is not in the range x>=1",
    ),
    Fault(
        id="eval/seq-len-negative",
        description="`compress eval --seq-len -5`",
        setup=eval_of("--seq-len", "-5"),
        message="Invalid value for '--seq-len': -5 is not in the range x>=1",
    ),
    Fault(
        id="eval/samples-not-a-number",
        description="`compress eval --samples many`",
        setup=eval_of("--samples", "many"),
        message="Invalid value for '--samples'",
    ),
    Fault(
        id="eval/unknown-shipped-sample",
        description="`compress eval --data builtin:wikitext-3` (no sample of that name ships with compress)",
        setup=eval_of("--data", "builtin:wikitext-3"),
        message="no shipped data sample named 'wikitext-3' (did you mean 'wikitext-2-test'?)",
        place="--data",
    ),
    Fault(
        id="eval/unknown-metric",
        description="`compress eval --metric perplexty`",
        setup=eval_of("--metric", "perplexty"),
        message="unknown metric 'perplexty' (did you mean 'perplexity'?)",
        place="--metric",
    ),
    Fault(
        id="eval/metric-for-another-task",
        description="`compress eval --metric cosine` (an encoder metric) on a causal LM",
        setup=eval_of("--metric", "cosine"),
        message="metric 'cosine' does not apply to a causal-lm model",
        place="--metric",
    ),
    Fault(
        id="eval/missing-checkpoint",
        description="`compress eval` of a checkpoint path that does not exist",
        setup=eval_of(checkpoint=missing),
        message="not a built-in model name",
        place="no-such-checkpoint",
    ),
    Fault(
        id="eval/checkpoint-is-a-file",
        description="`compress eval` of a file instead of a checkpoint directory",
        setup=eval_of(checkpoint=a_file),
        message="not a built-in model name",
        place="model.safetensors",
    ),
    Fault(
        id="eval/checkpoint-config-invalid",
        description="`compress eval` of a checkpoint whose config.json is `{not json`",
        setup=eval_of(checkpoint=damaged_model(config_bytes(b"{not json"))),
        message="config.json is not valid JSON",
        place="model/config.json:1:2",
    ),
    Fault(
        id="eval/checkpoint-without-linear-weights",
        description="`compress eval` of a checkpoint whose safetensors hold only the embedding table",
        setup=eval_of(checkpoint=damaged_model(only_embeddings)),
        message="lacks",
        place="model",
    ),
    Fault(
        id="eval/checkpoint-remote-code",
        description="`compress eval` of a checkpoint whose architecture is custom code (`auto_map`)",
        setup=eval_of(checkpoint=damaged_model(remote_code)),
        message="trust_remote_code",
        place="model",
    ),
]
