"""Bad kl_ptq stages: a storage budget no candidate grid meets, outliers a format cannot hold,
an unknown KL estimator. All refused at ``compress recipe check``, before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.harness import Fault, recipe_setup


def kl_ptq(output_format: str = "dense", **changes: Any) -> Callable[[Path], list[str]]:
    """A ``recipe check`` setup with one kl_ptq stage (4 bits, groups of 32) and ``changes``."""
    stage = {"method": "kl_ptq", "bits": 4, "group_size": 32, **changes}
    return recipe_setup(stages=[stage], output_format=output_format)


CASES = [
    Fault(
        id="klptq/budget-unreachable",
        description="kl_ptq W4 g32 with `bits_per_weight: 4.2`, below the 4.5 bits that codes and scales take",
        setup=kl_ptq(bits_per_weight=4.2),
        message="bits_per_weight: 4.2 cannot be met by any candidate grid: the nearest achievable is 4.5000",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="klptq/outliers-into-compressed-tensors",
        description="kl_ptq with 1% outliers on a grid of their own, written as compressed-tensors",
        setup=kl_ptq("compressed-tensors", outlier_fraction=0.01),
        message="'compressed-tensors' cannot store outlier weights",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="klptq/budget-room-for-outliers-into-compressed-tensors",
        description="kl_ptq W4 g32 with `bits_per_weight: 4.55`, which leaves room for outliers, "
        "written as compressed-tensors (only a budget of bits + 16/group_size makes a plain grid)",
        setup=kl_ptq("compressed-tensors", bits_per_weight=4.55),
        message="'compressed-tensors' cannot store outlier weights",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="klptq/unknown-estimator",
        description="`kl_estimator: pointwize` (a misspelt estimator name)",
        setup=kl_ptq(kl_estimator="pointwize"),
        message="unknown kl_estimator 'pointwize' (did you mean 'pointwise'?)",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
]
