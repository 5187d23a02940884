"""Bad eqnet / eqnet_search recipes: bit widths, budgets, stage order, layer types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.faults.harness import CHECK, Fault


def eqnet_setup(stages: list[dict[str, Any]], argv: list[str] = CHECK) -> Callable[[Path], list[str]]:
    """A setup writing a tiny ResNet, 3 classes x 6 images and a recipe with ``stages``; runs ``argv``
    (``recipe check`` by default)."""

    def setup(work: Path) -> list[str]:
        from tests.plugins.eqnet.conftest import tiny_resnet
        from tests.test_images import write_images

        images = write_images(work / "images", ["cat", "dog", "frog"], 6)
        entry = {"path": str(images), "source": "images", "samples": 12}
        recipe = {
            "model": str(tiny_resnet(work / "model")),
            "data": {"train": entry, "calibration": entry, "holdout": entry},
            "stages": stages,
            "output": {"dir": str(work / "out"), "format": "dense"},
        }
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return list(argv)

    return setup


def in_format(setup: Callable[[Path], list[str]], output_format: str) -> Callable[[Path], list[str]]:
    """``setup`` with the recipe's output format changed to ``output_format``."""

    def changed(work: Path) -> list[str]:
        argv = setup(work)
        path = work / "recipe.yaml"
        recipe = yaml.safe_load(path.read_text())
        recipe["output"]["format"] = output_format
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return argv

    return changed


TRAIN = {"method": "eqnet", "steps": 2, "batch_size": 6}

RCO = {"method": "rco", "targets": ["Conv2d", "Linear"], "providers": ["eqnet"], "steps": 1, "batch_size": 3}

CASES = [
    Fault(
        id="eqnet/input-points-in-compressed-tensors",
        description="eqnet_search writing its sub-network's LSQ+ input quantization to compressed-tensors, "
        "which cannot hold it",
        setup=in_format(eqnet_setup([TRAIN, {"method": "eqnet_search", "bits": 4}]), "compressed-tensors"),
        message="output format 'compressed-tensors' cannot store activation quantization at input (output format "
        "dense keeps it, listing the points a runtime must quantize), but stage 2 (eqnet_search) produces it",
        place="recipe.yaml:17:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/configuration-and-budget",
        description="eqnet_search given both a configuration to evaluate and a budget to search under",
        setup=eqnet_setup([TRAIN, {"method": "eqnet_search", "bits": 4, "configuration": "rco"}]),
        message="give exactly one of average_bits, bitops (a budget), bits (a uniform sub-network) or configuration",
        place="recipe.yaml:13:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/rco-bits-outside-space",
        description="rco asking for 3-bit candidates of a supernet trained at 2, 4 and 8 bits",
        setup=eqnet_setup(
            [{**TRAIN, "w_bits": [2, 4, 8]}, {**RCO, "settings": {"bits": [2, 3]}, "budget": {"bits_per_weight": 4}}]
        ),
        message="settings: bits: 3 is outside the eqnet supernet's space ([2, 4, 8])",
        place="recipe.yaml:17:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/rco-input-bits-outside-space",
        description="rco asking for candidates on 2-bit inputs of a supernet whose inputs were trained at 4 and 8 bits",
        setup=eqnet_setup(
            [
                {**TRAIN, "a_bits": [4, 8]},
                {**RCO, "settings": {"bits": [2, 4], "input_bits": [2, 4]}, "budget": {"bitops_per_weight": 3000}},
            ]
        ),
        message="settings: input_bits: 2 is outside the eqnet supernet's space ([4, 8])",
        place="recipe.yaml:16:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/rco-budget-unreachable",
        description="rco over the eqnet supernet at 1.5 bits per weight, below every sub-network (2 bits at least)",
        setup=eqnet_setup([TRAIN, {**RCO, "settings": {"bits": [2, 4]}, "budget": {"bits_per_weight": 1.5}}]),
        message="budget bits_per_weight: 1.5 is below the cheapest configuration (bits_per_weight: at least 2,",
        place="recipe.yaml:13:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/rco-without-supernet",
        description="rco over eqnet's candidates with no eqnet stage (the supernet) before it",
        setup=eqnet_setup([{**RCO, "settings": {"bits": [2, 4]}, "budget": {"bits_per_weight": 4}}]),
        message="provider 'eqnet' has no candidates here: eqnet offers the sub-networks of the supernet an eqnet "
        "stage trains, and no earlier stage is one",
        place="recipe.yaml:10:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/bits-outside-space",
        description="an eqnet space with 9-bit weights (the elastic space is 2..8 bits)",
        setup=eqnet_setup([{**TRAIN, "w_bits": [2, 4, 9]}]),
        message="w_bits: 9 is outside EQ-Net's elastic space (2..8 bits)",
        place="recipe.yaml:14:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/uniform-outside-space",
        description="exporting W2A2 from a supernet trained at 4 and 8 bits only",
        setup=eqnet_setup([{**TRAIN, "w_bits": [4, 8], "a_bits": [4, 8]}, {"method": "eqnet_search", "bits": 2}]),
        message="W2A2 is outside the supernet's elastic space (weights [4, 8], inputs [4, 8])",
        place="recipe.yaml:19:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/budget-unreachable",
        description="a search at 1.5 average bits over a 2..8-bit supernet",
        setup=eqnet_setup([TRAIN, {"method": "eqnet_search", "average_bits": 1.5}]),
        message="average_bits: 1.5 is below every sub-network (smallest reachable average_bits: 2)",
        place="recipe.yaml:13:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/search-without-supernet",
        description="an eqnet_search stage with no eqnet stage before it and no supernet file",
        setup=eqnet_setup([{"method": "eqnet_search", "average_bits": 4}]),
        message="eqnet_search needs an eqnet stage before it (the supernet)",
        place="recipe.yaml:10:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="eqnet/unsupported-layer",
        description="eqnet targeting the batch norms, which the elastic quantizers do not handle",
        setup=eqnet_setup([{**TRAIN, "targets": ["BatchNorm2d"]}]),
        message="eqnet cannot compress resnet.embedder.embedder.normalization (BatchNorm2d); it handles Conv2d, Linear",
        place="recipe.yaml:14:3",
        must_not_exist=("out",),
    ),
]
