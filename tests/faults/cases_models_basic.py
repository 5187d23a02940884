"""Damaged model directories and files: missing pieces, corrupt or misshapen weights, bad values."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import Fault, copy_tiny_model, recipe_setup

WEIGHTS = "model.safetensors"


def damaged(
    damage: Callable[[Path], None], command: str = "check", **model_keys: object
) -> Callable[[Path], list[str]]:
    """A setup copying the tiny model to ``work/model``, damaging it, and running a recipe on it
    (whose ``model:`` has ``model_keys`` beside the name)."""

    def model(work: Path) -> Path | dict:
        copy = copy_tiny_model(work, damage=damage)
        return {"name": copy, **model_keys} if model_keys else copy

    return recipe_setup(command=command, model=model)


def edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage that rewrites the weights file after ``edit`` changed its tensors."""

    def damage(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / WEIGHTS)
        edit(tensors)
        save_file(tensors, model / WEIGHTS, metadata={"format": "pt"})

    return damage


def edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A damage that rewrites config.json after ``edit`` changed it."""

    def damage(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        edit(config)
        (model / "config.json").write_text(json.dumps(config))

    return damage


def truncate(model: Path) -> None:
    weights = model / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def poison(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = value

    return edit


def reshape(tensors: dict) -> None:
    import torch

    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)


def drop_tensor(tensors: dict) -> None:
    del tensors["model.layers.1.self_attn.v_proj.weight"]


def pickled_weights_only(model: Path) -> None:
    (model / WEIGHTS).rename(model / "pytorch_model.bin")


def unknown_model_type(config: dict) -> None:
    config["model_type"] = "not-a-real-architecture"


def symlink_loop(model: Path) -> None:
    import shutil

    shutil.rmtree(model)
    model.symlink_to(model)


def more_layers(config: dict) -> None:
    config["num_hidden_layers"] = 4


def damaged_file(name: str, content: bytes) -> Callable[[Path], list[str]]:
    """A setup whose recipe names ``work/name`` (written with ``content``) as the model."""

    def model(work: Path) -> Path:
        (work / name).write_bytes(content)
        return work / name

    return recipe_setup(model=model)


def empty_directory(work: Path) -> Path:
    (work / "model").mkdir()
    return work / "model"


def missing_model(name: str, command: str) -> Callable[[Path], list[str]]:
    """A setup whose recipe names ``work/name``, which does not exist."""
    return recipe_setup(command=command, model=lambda work: work / name)


CASES = [
    Fault(
        id="model/missing-path",
        description="`model:` names a path that does not exist",
        setup=missing_model("no-such-model", "apply"),
        message="not a built-in model name",
        place="recipe.yaml:1:8",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/empty-directory",
        description="`model:` is an empty directory",
        setup=recipe_setup(model=empty_directory),
        message="no config.json",
        place="model",
    ),
    Fault(
        id="model/missing-config",
        description="a checkpoint directory without config.json",
        setup=damaged(lambda model: (model / "config.json").unlink()),
        message="no config.json",
        place="model",
    ),
    Fault(
        id="model/unknown-model-type",
        description="config.json with `model_type: not-a-real-architecture`",
        setup=damaged(edit_config(unknown_model_type)),
        message="not-a-real-architecture",
        place="model",
    ),
    Fault(
        id="model/config-more-layers-than-weights",
        description="config.json says 4 layers, the weights hold 2",
        setup=damaged(edit_config(more_layers), command="apply"),
        message="lacks 18 weight(s)",
        place="model",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/symlink-loop",
        description="`model:` is a symbolic link to itself",
        setup=damaged(symlink_loop),
        message="model",
        place="recipe.yaml:",
    ),
    Fault(
        id="model/missing-weights",
        description="a checkpoint directory without weights",
        setup=damaged(lambda model: (model / WEIGHTS).unlink()),
        message="no .safetensors weights",
        place="model",
    ),
    Fault(
        id="model/pickle-weights-only",
        description="weights only as pytorch_model.bin (pickle)",
        setup=damaged(pickled_weights_only),
        message="pickle files are never loaded",
        place="model",
    ),
    Fault(
        id="model/truncated-safetensors",
        description="model.safetensors cut to half its size",
        setup=damaged(truncate, command="apply"),
        message="corrupt safetensors file",
        place="model.safetensors",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/garbage-safetensors",
        description="model.safetensors holding random bytes",
        setup=damaged(lambda model: (model / WEIGHTS).write_bytes(bytes(range(256)) * 64)),
        message="corrupt safetensors file",
        place="model.safetensors",
    ),
    Fault(
        id="model/empty-safetensors",
        description="an empty (0-byte) model.safetensors",
        setup=damaged(lambda model: (model / WEIGHTS).write_bytes(b"")),
        message="corrupt safetensors file",
        place="model.safetensors",
    ),
    Fault(
        id="model/shape-mismatch",
        description="q_proj stored as 32x64 where config.json says 64x64",
        setup=damaged(edit_tensors(reshape), command="apply"),
        message="model.layers.0.self_attn.q_proj",
        place="model",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/missing-tensor",
        description="one Linear weight missing from model.safetensors",
        setup=damaged(edit_tensors(drop_tensor), command="apply"),
        message="model.layers.1.self_attn.v_proj.weight",
        place="model",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/nan-weights",
        description="one NaN in layer 1's up_proj weight",
        setup=damaged(edit_tensors(poison(float("nan"))), command="apply"),
        message="weights contain NaN or inf",
        place="model.layers.1.mlp.up_proj",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/inf-weights",
        description="one +inf in layer 1's up_proj weight",
        setup=damaged(edit_tensors(poison(float("inf"))), command="apply"),
        message="weights contain NaN or inf",
        place="model.layers.1.mlp.up_proj",
        must_not_exist=("out",),
    ),
    Fault(
        id="model/missing-gguf",
        description="`model: model.gguf`, a file that does not exist",
        setup=missing_model("model.gguf", "check"),
        message="model.gguf",
        place="recipe.yaml:1",
    ),
    Fault(
        id="model/garbage-gguf",
        description="a .gguf file holding random bytes",
        setup=damaged_file("model.gguf", bytes(range(256)) * 16),
        message="unreadable GGUF file",
        place="model.gguf",
    ),
]
