"""Bad search stages (rco, evopress): budgets, cost units, candidate providers and settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import Fault, recipe_setup

TARGETS = ["re:.*(q|k|v|o|gate|up|down)_proj$"]


def search(output_format: str = "compressed-tensors", **changes: Any) -> Callable[[Path], list[str]]:
    """A setup whose recipe has one rco stage (gptq and rtn candidates at 2-4 bits, groups of 32,
    3 bits per weight) with ``changes``, run through ``compress apply``."""
    stage = {
        "method": "rco",
        "targets": TARGETS,
        "providers": ["gptq", "rtn"],
        "settings": {"bits": [2, 3, 4], "group_size": [32]},
        "budget": {"bits_per_weight": 3.0},
        "steps": 2,
        **changes,
    }
    return recipe_setup(command="apply", stages=[stage], output_format=output_format)


CASES = [
    Fault(
        id="search/budget-below-cheapest",
        description="an rco budget of 1.5 bits per weight, below every layer at 2 bits (2.5 with the scales)",
        setup=search(budget={"bits_per_weight": 1.5}),
        message="budget bits_per_weight: 1.5 is below the cheapest configuration (bits_per_weight: 2.5,",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/kl-ptq-budget-below-bounds",
        description="an rco budget of 3 bits per weight over kl_ptq candidates (3 and 4 bits, 1% outliers), whose "
        "storage is at least 3.75 bits whatever the weights (only bounds are known before the outliers are found)",
        setup=search(
            providers=["kl_ptq"], settings={"bits": [3, 4], "group_size": [32]}, budget={"bits_per_weight": 3}
        ),
        message="budget bits_per_weight: 3 is below the cheapest configuration (bits_per_weight: at least 3.74745,",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/budget-above-dearest",
        description="an rco budget of 6 bits per weight with candidates of at most 4 bits (4.5 with the scales)",
        setup=search(budget={"bits_per_weight": 6}),
        message="budget bits_per_weight: 6 is above the dearest configuration (bits_per_weight: 4.5,",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/unknown-cost-unit",
        description="a budget in `flops_per_weight`, a unit compress does not know",
        setup=search(budget={"flops_per_weight": 3}),
        message="unknown cost unit 'flops_per_weight'",
        place="recipe.yaml:26:5",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/unit-no-provider-prices",
        description="a BitOps budget over kl_ptq candidates only, which price storage bits and weights kept",
        setup=search(providers=["kl_ptq"], budget={"bitops_per_weight": 48}),
        message="budget in bitops_per_weight: no candidate provider prices bitops (they price: kl_ptq: bits, params)",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/unit-no-provider-prices-for-layer",
        description="sparsity candidates (only magnitude offers them; it prices weights kept and BitOps) under a "
        "budget in bits per weight, which only rtn, offering nothing for these settings, prices",
        setup=search(providers=["magnitude", "rtn"], settings={"sparsity": [0.25, 0.5]}),
        message="model.layers.0.self_attn.q_proj: budget in bits_per_weight: no candidate provider for this Linear "
        "prices bits (they price: magnitude: bitops, params)",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/bits-out-of-range",
        description="9-bit candidates, beyond the 8 bits a quantization scheme can hold",
        setup=search(settings={"bits": [2, 9], "group_size": [32]}),
        message="bits 9: Input should be less than or equal to 8",
        place="recipe.yaml:19:5",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/no-provider-for-layer",
        description="groups of 48 columns, which divide no layer's input width (64, 128): no candidate anywhere",
        setup=search(settings={"bits": [2, 3, 4], "group_size": [48]}),
        message="model.layers.0.self_attn.q_proj: no candidate provider offers variants of this Linear",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/setting-no-provider-understands",
        description="`outlier_fraction` for gptq and rtn candidates (only kl_ptq understands it)",
        setup=search(settings={"bits": [2, 3], "outlier_fraction": [0.01]}),
        message="candidate setting 'outlier_fraction' is understood by no provider (gptq: bits,",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/unknown-provider",
        description="`providers: [gptqq]`, a misspelled candidate provider",
        setup=search(providers=["gptqq"]),
        message="no installed method named 'gptqq' offers candidates (did you mean 'gptq'?)",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
    Fault(
        id="search/budget-unit-format-cannot-meet",
        description="a budget in bits per weight with the dense output format, which stores the weights unpacked",
        setup=search(output_format="dense"),
        message="a budget in bits_per_weight cannot be met by output format 'dense'",
        place="recipe.yaml:12:3",
        must_not_exist=("out",),
    ),
]
