"""Bad kl_ptq stages: a storage budget no candidate grid meets, outliers a format cannot hold,
an unknown KL estimator. All refused at ``compress recipe check``, before anything is written."""

from __future__ import annotations

from typing import Any

from tests.faults.harness import Fault, recipe_setup


def kl_ptq(output_format: str = "dense", **changes: Any):
    """A ``recipe check`` setup with one kl_ptq stage (4 bits, groups of 32) and ``changes``."""

    def setup(work):
        stage = {"method": "kl_ptq", "bits": 4, "group_size": 32, **changes}
        return recipe_setup(stages=[stage], output={"dir": str(work / "out"), "format": output_format})(work)

    return setup


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
        id="klptq/unknown-estimator",
        description="`kl_estimator: pointwize` (a misspelt estimator name)",
        setup=kl_ptq(kl_estimator="pointwize"),
        message="unknown kl_estimator 'pointwize' (did you mean 'pointwise'?)",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
]
