"""Bad eqnet / eqnet_search recipes: bit widths, budgets, stage order, configurations, layer types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.faults.harness import CHECK, Fault


def eqnet_setup(stages: list[dict[str, Any]], output_format: str = "dense") -> Callable[[Path], list[str]]:
    """A setup writing a tiny ResNet, 3 classes x 6 images and a recipe with ``stages`` written in
    ``output_format``; runs ``recipe check``."""

    def setup(work: Path) -> list[str]:
        from tests.plugins.eqnet.conftest import tiny_resnet
        from tests.test_images import write_images

        images = write_images(work / "images", ["cat", "dog", "frog"], 6)
        entry = {"path": str(images), "source": "images", "samples": 12}
        recipe = {
            "model": str(tiny_resnet(work / "model")),
            "data": {"train": entry, "calibration": entry, "holdout": entry},
            "stages": stages,
            "output": {"dir": str(work / "out"), "format": output_format},
        }
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return list(CHECK)

    return setup


def refused(
    slug: str, description: str, stages: list[dict[str, Any]], message: str, place: str, output_format: str = "dense"
) -> Fault:
    """``recipe check`` of ``stages`` refused in one line at ``place`` (file:line:col), nothing written."""
    return Fault(
        id=f"eqnet/{slug}",
        description=description,
        setup=eqnet_setup(stages, output_format),
        message=message,
        place=place,
        must_not_exist=("out",),
    )


def rco(settings: dict[str, list[Any]], budget: dict[str, float], **stage: Any) -> dict[str, Any]:
    """An rco stage over eqnet's candidates."""
    base = {"method": "rco", "targets": ["Conv2d", "Linear"], "providers": ["eqnet"], "steps": 1, "batch_size": 3}
    return {**base, "settings": settings, "budget": budget, **stage}


def search(**params: Any) -> dict[str, Any]:
    """An eqnet_search stage."""
    return {"method": "eqnet_search", **params}


TRAIN = {"method": "eqnet", "steps": 2, "batch_size": 6}

CASES = [
    refused(
        "input-points-in-compressed-tensors",
        "eqnet_search writing its sub-network's LSQ+ input quantization to compressed-tensors, which cannot hold it",
        [TRAIN, search(bits=4)],
        "output format 'compressed-tensors' cannot store activation quantization at input (output format "
        "dense keeps it, listing the points a runtime must quantize), but stage 2 (eqnet_search) produces it",
        "recipe.yaml:17:11",
        output_format="compressed-tensors",
    ),
    refused(
        "configuration-and-budget",
        "eqnet_search given both a configuration to evaluate and a budget to search under",
        [TRAIN, search(bits=4, configuration="rco")],
        "give exactly one of average_bits, bitops (a budget), bits (a uniform sub-network) or configuration",
        "recipe.yaml:13:3",
    ),
    refused(
        "configuration-unknown-label",
        "eqnet_search evaluating the configuration of a stage label no earlier stage has",
        [TRAIN, rco({"bits": [2, 4]}, {"bits_per_weight": 4}), search(configuration="rco-3bit")],
        "'rco-3bit' is neither the label of an earlier stage of this recipe (earlier stages: eqnet, rco) "
        "nor a report.json",
        "recipe.yaml:28:18",
    ),
    refused(
        "configuration-later-stage",
        "eqnet_search evaluating the configuration of an rco stage that comes after it",
        [TRAIN, search(configuration="picked"), rco({"bits": [2, 4]}, {"bits_per_weight": 4}, name="picked")],
        "'picked' is neither the label of an earlier stage of this recipe (earlier stages: eqnet) nor a report.json",
        "recipe.yaml:14:18",
    ),
    refused(
        "configuration-not-a-search",
        "eqnet_search evaluating the configuration of the eqnet stage, which records none",
        [TRAIN, search(configuration="eqnet")],
        "stage 'eqnet' (eqnet) records no per-layer eqnet settings (configuration: takes an earlier rco, "
        "evopress or eqnet_search stage, or a report.json)",
        "recipe.yaml:14:18",
    ),
    refused(
        "configuration-rco-without-eqnet",
        "eqnet_search evaluating the configuration of an rco stage that searched rtn's candidates, not eqnet's",
        [TRAIN, rco({"bits": [2, 4]}, {"bits_per_weight": 4}, providers=["rtn"]), search(configuration="rco")],
        "stage 'rco' (rco) does not ask eqnet's candidates (providers ['rtn']), so it records no eqnet settings",
        "recipe.yaml:28:18",
    ),
    refused(
        "configuration-report-missing",
        "eqnet_search evaluating the configuration in a report.json that does not exist",
        [TRAIN, search(configuration="runs/w3/report.json")],
        "'runs/w3/report.json' is neither the label of an earlier stage of this recipe (earlier stages: eqnet) "
        "nor a report.json",
        "recipe.yaml:14:18",
    ),
    refused(
        "rco-bits-outside-space",
        "rco asking for 3-bit candidates of a supernet trained at 2, 4 and 8 bits",
        [{**TRAIN, "w_bits": [2, 4, 8]}, rco({"bits": [2, 3]}, {"bits_per_weight": 4})],
        "settings: bits: 3 is outside the eqnet supernet's space ([2, 4, 8])",
        "recipe.yaml:17:3",
    ),
    refused(
        "rco-input-bits-outside-space",
        "rco asking for candidates on 2-bit inputs of a supernet whose inputs were trained at 4 and 8 bits",
        [{**TRAIN, "a_bits": [4, 8]}, rco({"bits": [2, 4], "input_bits": [2, 4]}, {"bitops_per_weight": 3000})],
        "settings: input_bits: 2 is outside the eqnet supernet's space ([4, 8])",
        "recipe.yaml:16:3",
    ),
    refused(
        "rco-budget-unreachable",
        "rco over the eqnet supernet at 1.5 bits per weight, below every sub-network (2 bits at least)",
        [TRAIN, rco({"bits": [2, 4]}, {"bits_per_weight": 1.5})],
        "budget bits_per_weight: 1.5 is below the cheapest configuration (bits_per_weight: at least 2,",
        "recipe.yaml:13:3",
    ),
    refused(
        "rco-without-supernet",
        "rco over eqnet's candidates with no eqnet stage (the supernet) before it",
        [rco({"bits": [2, 4]}, {"bits_per_weight": 4})],
        "provider 'eqnet' has no candidates here: eqnet offers the sub-networks of the supernet an eqnet "
        "stage trains, and no earlier stage is one",
        "recipe.yaml:10:3",
    ),
    refused(
        "bits-outside-space",
        "an eqnet space with 9-bit weights (the elastic space is 2..8 bits)",
        [{**TRAIN, "w_bits": [2, 4, 9]}],
        "w_bits: 9 is outside EQ-Net's elastic space (2..8 bits)",
        "recipe.yaml:14:3",
    ),
    refused(
        "uniform-outside-space",
        "exporting W2A2 from a supernet trained at 4 and 8 bits only",
        [{**TRAIN, "w_bits": [4, 8], "a_bits": [4, 8]}, search(bits=2)],
        "W2A2 is outside the supernet's elastic space (weights [4, 8], inputs [4, 8])",
        "recipe.yaml:20:9",
    ),
    refused(
        "budget-unreachable",
        "a search at 1.5 average bits over a 2..8-bit supernet",
        [TRAIN, search(average_bits=1.5)],
        "average_bits: 1.5 is below every sub-network (smallest reachable average_bits: 2)",
        "recipe.yaml:14:17",
    ),
    refused(
        "average-bits-above-space",
        "a search at 9 average bits (weights and inputs in (8.5, 9]) over a 2..8-bit supernet",
        [TRAIN, search(average_bits=9)],
        "average_bits: 9 asks for more than 8.5 bits on average; the largest sub-network has 8 (largest "
        "reachable average_bits: 8.5, exclusive)",
        "recipe.yaml:14:17",
    ),
    refused(
        "average-bits-in-a-gap",
        "a search at 4.9 average bits over a supernet of 2- and 8-bit weights: the tiny ResNet's weight averages "
        "step from 4.35 to 4.92, so no sub-network's lie in (4.4, 4.9]",
        [{**TRAIN, "w_bits": [2, 8]}, search(average_bits=4.9)],
        "average_bits: 4.9 — no sub-network's weight bits average in (4.4, 4.9]; nearest reachable: 4.35 and 4.92",
        "recipe.yaml:17:17",
    ),
    refused(
        "bitops-unreachable",
        "a search under 1e6 BitOps per image, below the smallest sub-network of the tiny ResNet (first and last "
        "layer at 8 bits; MACs from the meta model's forward pass on one 32x32 image)",
        [TRAIN, search(bitops=1e6)],
        "bitops: 1e+06 is below every sub-network (smallest reachable bitops: 1.97949e+07, largest 2.76593e+07, "
        "per image)",
        "recipe.yaml:14:11",
    ),
    refused(
        "search-without-supernet",
        "an eqnet_search stage with no eqnet stage before it and no supernet file",
        [search(average_bits=4)],
        "eqnet_search needs an eqnet stage before it (the supernet)",
        "recipe.yaml:10:11",
    ),
    refused(
        "supernet-file-missing",
        "an eqnet_search stage starting from a supernet file that does not exist",
        [search(average_bits=4, supernet="runs/supernet/eqnet-supernet.pt")],
        "the file runs/supernet/eqnet-supernet.pt does not exist",
        "recipe.yaml:12:13",
    ),
    refused(
        "unsupported-layer",
        "eqnet targeting the batch norms, which the elastic quantizers do not handle",
        [{**TRAIN, "targets": ["BatchNorm2d"]}],
        "eqnet cannot compress resnet.embedder.embedder.normalization (BatchNorm2d); it handles Conv2d, Linear",
        "recipe.yaml:14:3",
    ),
]
