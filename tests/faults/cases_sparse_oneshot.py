"""One-shot pruning (magnitude, wanda, sparsegpt): bad patterns and fractions, formats and stage orders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import Fault, recipe_setup

DATA = "data:\n  calibration: {{path: {text}, samples: 4, seq_len: 32}}\n"


def pruning_recipe(stage_lines: str, output_format: str = "dense") -> Callable[[Path], list[str]]:
    output = f"output:\n  dir: {{out}}\n  format: {output_format}\n"
    return recipe_setup("model: {model}\n" + output + DATA + "stages:\n" + stage_lines)


CASES = [
    Fault(
        id="prune/n-not-below-m",
        description="sparsegpt `pattern: 4:4` (keeps every weight)",
        setup=pruning_recipe('  - method: sparsegpt\n    pattern: "4:4"\n'),
        message="pattern '4:4' needs 0 < N < M",
        place="recipe.yaml:9:14",
    ),
    Fault(
        id="prune/m-does-not-divide-width",
        description="wanda `pattern: 2:48` on layers 64 wide",
        setup=pruning_recipe('  - method: wanda\n    pattern: "2:48"\n'),
        message="input width 64 is not a multiple of M=48",
        place="model.layers.0.self_attn.q_proj",
    ),
    Fault(
        id="prune/sparsity-outside-0-1",
        description="magnitude `sparsity: 1.5`",
        setup=pruning_recipe("  - method: magnitude\n    sparsity: 1.5\n"),
        message="less than 1",
        place="recipe.yaml:9:15",
    ),
    Fault(
        id="prune/pattern-and-sparsity",
        description="sparsegpt with both `pattern: 2:4` and `sparsity: 0.5`",
        setup=pruning_recipe('  - method: sparsegpt\n    pattern: "2:4"\n    sparsity: 0.5\n'),
        message="give either pattern",
        place="recipe.yaml:8:5",
    ),
    Fault(
        id="prune/2of4-into-bitsandbytes",
        description="sparsegpt 2:4 written as bitsandbytes nf4, which records no N:M pattern",
        setup=pruning_recipe('  - method: sparsegpt\n    pattern: "2:4"\n', "bitsandbytes"),
        message="cannot record the 2:4 pattern",
        place="recipe.yaml:4:11",
    ),
    Fault(
        id="prune/gptq-after-2of4",
        description="sparsegpt 2:4, then gptq W4 on the same layers (its updates fill the zeros)",
        setup=pruning_recipe(
            '  - method: sparsegpt\n    pattern: "2:4"\n  - method: gptq\n    bits: 4\n    group_size: 32\n'
        ),
        message="stage 2 (gptq) would fill the zeros of the 2:4 sparsity that stage 1 (sparsegpt) leaves",
        place="recipe.yaml:10:13",
    ),
    Fault(
        id="prune/sparsegpt-after-a-quantizer",
        description="rtn W4, then sparsegpt without bits (its updates would leave the grid)",
        setup=pruning_recipe(
            '  - method: rtn\n    bits: 4\n    group_size: 32\n  - method: sparsegpt\n    pattern: "2:4"\n'
        ),
        message="sparsegpt without bits moves the weights off the grid stage 1 (rtn) leaves",
        place="recipe.yaml:11:13",
    ),
]
