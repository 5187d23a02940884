"""Targets that match modules a stage still cannot work on, refused at ``compress recipe check``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.faults.harness import Fault, copy_tiny_model, recipe_setup

VALUE_HEAD_CODE = """from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class ValueHeadConfig(LlamaConfig):
    model_type = "llama-value-head"


class ValueHeadForCausalLM(LlamaForCausalLM):
    config_class = ValueHeadConfig

    def __init__(self, config):
        super().__init__(config)
        self.value_head = nn.Linear(config.hidden_size, 1, bias=False)  # trained apart; forward never calls it
"""


def with_value_head(model: Path) -> None:
    """The tiny Llama as custom code that adds a ``value_head`` its forward pass does not use
    (as an RLHF checkpoint's reward head), its weight stored with the others."""
    import torch
    from safetensors.torch import load_file, save_file

    (model / "value_head_model.py").write_text(VALUE_HEAD_CODE, encoding="utf-8")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llama-value-head"
    config["auto_map"] = {
        "AutoConfig": "value_head_model.ValueHeadConfig",
        "AutoModelForCausalLM": "value_head_model.ValueHeadForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    tensors = load_file(model / "model.safetensors")
    tensors["value_head.weight"] = torch.zeros(1, config["hidden_size"])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


CASES = [
    Fault(
        id="targets/outside-blocks-unreached",
        description="gptq targeting `value_head`, a Linear outside the blocks that the model's forward never calls",
        setup=recipe_setup(
            command="apply",
            model=lambda work: {"name": copy_tiny_model(work, damage=with_value_head), "trust_remote_code": True},
            stages=[{"method": "gptq", "bits": 4, "group_size": 32, "targets": ["value_head"]}],
        ),
        env={"HF_MODULES_CACHE": "{work}/modules"},
        subprocess=True,
        message="target value_head: the model's forward pass does not reach this layer, so gptq cannot calibrate it",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
]
