"""``compress.reach.unreached``: the modules outside the blocks that a weightless model's forward
pass does not call (the check behind ``targets/outside-blocks-unreached`` in the fault corpus)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from compress.checkpoint.loaders import meta_model
from compress.reach import forward_inputs, unreached
from tests.models import tiny_vit_config


def test_a_module_the_forward_never_calls_is_found(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = meta_model(config, "causal-lm")
    model.value_head = nn.Linear(64, 1, device="meta")
    assert unreached(model, ["value_head", "lm_head", "model.norm"], "causal-lm", config) == ["value_head"]


def test_an_image_classifier_reaches_its_head():
    config = tiny_vit_config()
    assert unreached(meta_model(config, "image-classification"), ["classifier"], "image-classification", config) == []


class ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.sum().item() > 0:  # a value, which meta tensors lack
            return self.head(input_ids.float())
        return input_ids


def test_a_forward_that_needs_values_leaves_the_question_to_the_run():
    model = ReadsValues().to("meta")
    assert unreached(model, ["head"], "causal-lm", None) is None
    assert not model.head._forward_pre_hooks


def test_forward_inputs_are_shaped_as_the_image_processor_makes_them():
    from transformers import ViTImageProcessor

    config = tiny_vit_config(image_size=32)
    model = meta_model(config, "image-classification")
    fixed = ViTImageProcessor(size={"height": 32, "width": 32})
    assert forward_inputs(model, "image-classification", config, fixed)["pixel_values"].shape == (1, 3, 32, 32)
    following = ViTImageProcessor(do_resize=False)  # its output is the image's size: only the data tells
    assert forward_inputs(model, "image-classification", config, following) is None
    assert forward_inputs(model, "image-classification", config, None) is None
