"""Trained N:M sparsity (srste) and the 2:4 speed path (`compress semi-structured`): bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import Fault, copy_tiny_model, recipe_setup

SRSTE = "  - method: srste\n    steps: 2\n    batch_size: 2\n"


def srste_recipe(stage_lines: str, train: bool = True, command: str = "check") -> Callable[[Path], list[str]]:
    data = "data:\n  evaluation: {{path: {text}, samples: 4, seq_len: 32}}\n"
    if train:
        data += "  train: {{path: {text}, samples: 4, seq_len: 32}}\n"
    return recipe_setup("model: {model}\noutput: {{dir: {out}}}\n" + data + "stages:\n" + stage_lines, command=command)


def marked_checkpoint(work: Path, prune: bool) -> Path:
    """The tiny model with its MLP layers marked 2:4 in sparsity_config (pruned so, or not)."""
    import torch
    from safetensors.torch import load_file, save_file

    from compress_nm.patterns import NMPattern, nm_keep_mask

    model = copy_tiny_model(work)
    tensors = load_file(model / "model.safetensors")
    mlp = sorted(key.removesuffix(".weight") for key in tensors if ".mlp." in key)
    if prune:
        for name in mlp:
            weight = tensors[f"{name}.weight"]
            tensors[f"{name}.weight"] = weight * nm_keep_mask(weight.abs().float(), NMPattern(2, 4)).to(torch.uint8)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {"format": "dense", "sparsity_structure": "2:4", "targets": mlp, "ignore": []},
    }
    (model / "config.json").write_text(json.dumps(config))
    return model


def semi_structured(prune: bool, *options: str) -> Callable[[Path], list[str]]:
    def setup(work: Path) -> list[str]:
        return ["semi-structured", str(marked_checkpoint(work, prune)), *options]

    return setup


CASES = [
    Fault(
        id="srste/without-training-data",
        description="an srste stage in a recipe with no `train` data entry",
        setup=srste_recipe(SRSTE, train=False),
        message="reads data: train:, which the recipe lacks",
        place="recipe.yaml:",
    ),
    Fault(
        id="srste/width-not-divisible",
        description="srste `pattern: 3:5` on layers 64 wide",
        setup=srste_recipe(SRSTE + '    pattern: "3:5"\n'),
        message="input width 64 is not a multiple of M=5",
        place="model.layers.0.self_attn.q_proj",
    ),
    Fault(
        id="srste/after-a-quantizer",
        description="rtn W4, then srste on the same layers",
        setup=srste_recipe("  - method: rtn\n    bits: 4\n    group_size: 32\n" + SRSTE, command="apply"),
        message="srste moves the mask and would leave the grid",
        place="model.layers.0.self_attn.q_proj",
        must_not_exist=("out",),
    ),
    Fault(
        id="speed-path/broken-pattern",
        description="`compress semi-structured` on a checkpoint that marks dense layers 2:4",
        setup=semi_structured(False, "--device", "cpu"),
        message="not 2:4 sparse: row 0",
        place="model.layers.0.mlp.down_proj",
        subprocess=True,
    ),
    Fault(
        id="speed-path/no-gpu",
        description="`compress semi-structured --device cpu` on a real 2:4 checkpoint",
        setup=semi_structured(True, "--device", "cpu"),
        message="need a CUDA GPU of compute capability 8.0+, not cpu; 6 layers verified 2:4",
        subprocess=True,
    ),
    Fault(
        id="speed-path/unknown-layer",
        description="`compress semi-structured --layer` naming a layer the model lacks",
        setup=semi_structured(True, "--device", "cpu", "--layer", "model.layers.0.mlp.upp_proj"),
        message="matches no Linear layer",
        place="model.layers.0.mlp.upp_proj",
        subprocess=True,
    ),
]
