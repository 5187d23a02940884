"""Recipe overrides (``--set KEY=VALUE``) and preset schemes (``scheme:``) a user gets wrong."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import RECIPE_HEAD, Fault, recipe_argv, recipe_setup

RECIPE = RECIPE_HEAD + "  - method: rtn\n    group_size: 32\n    bits: 4\n"
"""The stage is at line 4, its bits at line 6."""


def with_overrides(*overrides: str, command: str = "apply", text: str = RECIPE) -> Callable[[Path], list[str]]:
    """A setup writing the recipe and running ``command`` on it with ``--set`` for each override."""
    write = recipe_setup(text, command=command)

    def setup(work: Path) -> list[str]:
        write(work)
        return [*recipe_argv(command), *(arg for override in overrides for arg in ("--set", override))]

    return setup


CASES = [
    Fault(
        id="overrides/unknown-key",
        description="`--set` of a key the stage's method does not have (`--set stages.0.bitz=3`)",
        setup=with_overrides("stages.0.bitz=3"),
        message="unknown key 'bitz' (did you mean 'bits'?)",
        place="recipe.yaml:4:5 (--set stages.0.bitz=3)",
        must_not_exist=("out",),
    ),
    Fault(
        id="overrides/unknown-section",
        description="`--set` through a key the recipe does not have (`--set ouptut.dir=x`)",
        setup=with_overrides("ouptut.dir=x", command="check"),
        message="unknown key 'ouptut' in the recipe (did you mean 'output'?)",
        place="recipe.yaml:1:1 (--set ouptut.dir=x)",
    ),
    Fault(
        id="overrides/bad-value",
        description="`--set` of a value the parameter refuses (`--set stages.0.bits=eleven`)",
        setup=with_overrides("stages.0.bits=eleven"),
        message="stages.0.bits: Input should be a valid integer",
        place="recipe.yaml:6:11 (--set stages.0.bits=eleven)",
        must_not_exist=("out",),
    ),
    Fault(
        id="overrides/no-such-stage",
        description="`--set` of a stage the recipe does not have (`--set stages.gptq.bits=3`)",
        setup=with_overrides("stages.gptq.bits=3", command="check"),
        message="stages has no entry named 'gptq'",
        place="recipe.yaml:4:3 (--set stages.gptq.bits=3)",
    ),
    Fault(
        id="overrides/not-key-value",
        description="`--set` without `=` (`--set stages.0.bits`)",
        setup=with_overrides("stages.0.bits", command="check"),
        message="expected KEY=VALUE",
        place="--set stages.0.bits",
    ),
    Fault(
        id="overrides/unknown-preset",
        description="a misspelled preset scheme (`scheme: W4A61`)",
        setup=recipe_setup(RECIPE + "    scheme: W4A61\n", command="apply"),
        message="unknown scheme 'W4A61' (did you mean 'W4A16'?)",
        place="recipe.yaml:7:13",
        must_not_exist=("out",),
    ),
    Fault(
        id="overrides/unsupported-preset",
        description="a preset no method here makes, set on the command line (`--set stages.0.scheme=NVFP4`)",
        setup=with_overrides("stages.0.scheme=NVFP4", command="check"),
        message="scheme 'NVFP4' has 4-bit float weights; the methods here make integer grids (schemes rtn takes:",
        place="recipe.yaml:4:5 (--set stages.0.scheme=NVFP4)",
    ),
]
