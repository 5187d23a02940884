"""Bad fimaq stages: activation bits outside 2..8, an activation point that does not exist,
image data whose classes differ from the classifier's, text data for an image model and the
reverse, fewer calibration samples than a batch, a format that cannot store activation
quantization. All refused at ``compress recipe check``, before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import CHECK, Fault, data_entry, recipe_setup, write_recipe

CLASSES = ["cat", "dog", "frog"]


def fimaq(output_format: str = "dense", **changes: Any) -> Callable[[Path], list[str]]:
    """A ``recipe check`` setup on the tiny Llama with one fimaq stage (batches of 4) and ``changes``."""
    stage = {"method": "fimaq", "batch_size": 4, **changes}
    return recipe_setup(stages=[stage], output_format=output_format)


def tiny_vit(work: Path) -> Path:
    """A two-layer ViT for the three classes, with its image processor, in ``work/vit``."""
    import torch
    from transformers import ViTForImageClassification

    from tests.models import tiny_vit_config
    from tests.test_images import save_classifier

    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {name: i for i, name in enumerate(CLASSES)}}
    torch.manual_seed(0)
    return save_classifier(ViTForImageClassification(tiny_vit_config(image_size=32, **labels)), work / "vit")


def images(work: Path, classes: list[str]) -> Path:
    from tests.test_images import write_images

    return write_images(work / "images", classes, 2)


def image_recipe(model: Callable[[Path], Path], data: Callable[[Path], dict]) -> Callable[[Path], list[str]]:
    """A ``recipe check`` setup with one fimaq stage on ``model(work)`` calibrated on ``data(work)``."""

    def setup(work: Path) -> list[str]:
        stage = {"method": "fimaq", "batch_size": 2, "targets": ["Linear"]}
        write_recipe(work, model=str(model(work)), data={"calibration": data(work)}, stages=[stage], evaluate=[])
        return list(CHECK)

    return setup


def image_data(classes: list[str]) -> Callable[[Path], dict]:
    return lambda work: {"path": str(images(work, classes)), "source": "images", "samples": 2 * len(classes)}


CASES = [
    Fault(
        id="fimaq/activation-bits-1",
        description="fimaq with `activation_bits: 1`",
        setup=fimaq(activation_bits=1),
        message="greater than or equal to 2",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/activation-bits-9",
        description="fimaq with `activation_bits: 9`",
        setup=fimaq(activation_bits=9),
        message="less than or equal to 8",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/unknown-activation-point",
        description="fimaq with `points: [query, scores]` (attention scores are not a quantization point)",
        setup=fimaq(points=["query", "scores"]),
        message="'input', 'query', 'key', 'value' or 'probs'",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/reparameterize-without-channel-ranges",
        description="fimaq with `reparameterize_layernorm: true` and `channel_inputs: false` (nothing to fold)",
        setup=fimaq(reparameterize_layernorm=True, channel_inputs=False),
        message="it needs channel_inputs: true and 'input' in points",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/fewer-samples-than-batch",
        description="fimaq with `batch_size: 32` and 4 calibration samples",
        setup=fimaq(batch_size=32),
        message="fimaq draws batches of 32 calibration samples, but data: calibration: has 4",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/compressed-tensors",
        description="fimaq written as compressed-tensors, which cannot store attention activation quantization",
        setup=fimaq("compressed-tensors"),
        message="cannot store activation quantization at input, query, key, value, probs",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/label-count",
        description="fimaq on a 3-class ViT calibrated on images of 4 classes",
        setup=image_recipe(tiny_vit, image_data([*CLASSES, "horse"])),
        message="the data has 4 classes but the model's classifier head has num_labels = 3",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/image-data-text-model",
        description="fimaq on the tiny Llama calibrated on images",
        setup=image_recipe(lambda work: Path(recipe_model()), image_data(CLASSES)),
        message="image data needs an image-classification model, but the model is a causal-lm model",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="fimaq/text-data-image-model",
        description="fimaq on a ViT calibrated on text",
        setup=image_recipe(tiny_vit, lambda work: data_entry()),
        message="text data holds text, but the model is an image classifier",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
]


def recipe_model() -> Path:
    from tests.faults.harness import tiny_model

    return tiny_model()
