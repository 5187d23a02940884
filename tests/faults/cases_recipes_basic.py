"""Recipe mistakes a user makes every day: keys, types, names, targets, YAML shape."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import (
    APPLY,
    CHECK,
    RECIPE_HEAD,
    Fault,
    copy_tiny_model,
    data_entry,
    recipe_setup,
    write_recipe,
)


def stage(lines: str, command: str = "check") -> Callable[[Path], list[str]]:
    """A setup whose recipe has one stage (``lines``, each indented by four spaces after the first)."""
    return recipe_setup(RECIPE_HEAD + "  - " + lines, command=command)


def output_exists(work: Path) -> list[str]:
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    write_recipe(work)
    return APPLY


def missing_data_file(work: Path) -> list[str]:
    data = data_entry(work / "missing.txt")
    write_recipe(work, data={"calibration": data, "evaluation": data})
    return APPLY


def data_path_is_a_directory(work: Path) -> list[str]:
    (work / "texts").mkdir()
    data = data_entry("texts")
    write_recipe(work, data={"calibration": data, "evaluation": data})
    return CHECK


def output_is_the_model(work: Path) -> list[str]:
    model = copy_tiny_model(work)
    write_recipe(work, model=model, output={"dir": model})
    return [*APPLY, "--overwrite"]


def output_is_the_working_directory(work: Path) -> list[str]:
    (work / "notes.txt").write_text("mine")
    write_recipe(work, output={"dir": "."})
    return [*APPLY, "--overwrite"]


def output_holds_the_recipe(work: Path) -> list[str]:
    (work / "sub").mkdir()
    write_recipe(work / "sub", output={"dir": "sub"})
    return ["apply", "sub/recipe.yaml", "--overwrite"]


def missing_recipe(work: Path) -> list[str]:
    return ["apply", "nope.yaml"]


def recipe_is_a_directory(work: Path) -> list[str]:
    (work / "recipe.yaml").mkdir()
    return CHECK


def large_recipe_text(stages: int, error: bool) -> str:
    """The corpus's largest recipe: ``stages`` rtn stages, each naming every Linear layer of the
    tiny model twice (exact names and one regular expression per layer); with ``error``, the
    last stage misspells ``group_size``."""
    layers = [
        f"model.layers.{index}.{part}"
        for index in range(2)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    targets = [*layers, *(f"re:^{name.replace('.', '[.]')}$" for name in layers)]
    lines = [RECIPE_HEAD]
    for number in range(stages):
        key = "group_sise" if error and number == stages - 1 else "group_size"
        lines.append(f"  - method: rtn\n    name: stage-{number}\n    bits: 8\n    {key}: 32\n    targets:\n")
        lines += [f"      - {target!r}\n" for target in targets]
    return "".join(lines)


LARGE_STAGES = 200
LARGE_ERROR_LINE = next(
    number
    for number, line in enumerate(large_recipe_text(LARGE_STAGES, error=True).splitlines(), 1)
    if "group_sise" in line
)


CASES = [
    Fault(
        id="recipe/unknown-key",
        description="a misspelled stage key (`group_sise: 64`)",
        setup=stage("method: rtn\n    bits: 4\n    group_sise: 64\n", command="apply"),
        message="unknown key 'group_sise'",
        place="recipe.yaml:6:5",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/unknown-top-level-key",
        description="a misspelled top-level key (`stagse:`)",
        setup=recipe_setup("model: {model}\noutput: {{dir: {out}}}\nstagse:\n  - method: rtn\n"),
        message="stagse",
        place="recipe.yaml:3:1",
    ),
    Fault(
        id="recipe/wrong-type",
        description="a word where a number belongs (`bits: four`)",
        setup=stage("method: rtn\n    bits: four\n", command="apply"),
        message="stages.0.bits",
        place="recipe.yaml:5:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/bits-out-of-range",
        description="`bits: 9` for rtn (at most 8)",
        setup=stage("method: rtn\n    bits: 9\n", command="apply"),
        message="less than or equal to 8",
        place="recipe.yaml:5:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/unknown-method",
        description="a misspelled method name (`method: rnt`)",
        setup=stage("method: rnt\n    bits: 4\n", command="apply"),
        message="unknown method 'rnt' (did you mean 'rtn'?)",
        place="recipe.yaml:4:13",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/stage-without-method",
        description="a stage with parameters but no `method:`",
        setup=stage("bits: 4\n    group_size: 32\n"),
        message="method",
        place="recipe.yaml:4",
    ),
    Fault(
        id="recipe/stage-is-a-string",
        description="a stage written as a bare name (`- rtn`)",
        setup=recipe_setup(RECIPE_HEAD + "  - rtn\n"),
        message="stages.0",
        place="recipe.yaml:4",
    ),
    Fault(
        id="recipe/target-matches-nothing",
        description="a target regular expression matching no module (`re:.*qkv_proj$`)",
        setup=stage("method: rtn\n    bits: 4\n    targets: ['re:.*qkv_proj$']\n"),
        message="target 're:.*qkv_proj$' matches no module",
        place="recipe.yaml:6:15",
    ),
    Fault(
        id="recipe/invalid-regex",
        description="a target that is not a regular expression (`re:(unclosed`)",
        setup=stage("method: rtn\n    bits: 4\n    targets: ['re:(unclosed']\n"),
        message="invalid regular expression",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/group-size-does-not-divide",
        description="`group_size: 48` on layers 64 and 128 wide",
        setup=stage("method: rtn\n    bits: 4\n    group_size: 48\n", command="apply"),
        message="group_size 48 does not divide the input width 64",
        place="model.layers.0.self_attn.q_proj",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/duplicate-key",
        description="the same key twice in a stage (`bits: 4`, `bits: 3`)",
        setup=stage("method: rtn\n    bits: 4\n    bits: 3\n"),
        message="duplicate key 'bits'",
        place="recipe.yaml:6:5",
    ),
    Fault(
        id="recipe/invalid-yaml",
        description="an unclosed bracket (`model: [unclosed`)",
        setup=recipe_setup("model: [unclosed\nstages: []\n"),
        message="invalid YAML",
        place="recipe.yaml:",
    ),
    Fault(
        id="recipe/tab-indentation",
        description="a stage indented with a tab",
        setup=recipe_setup(RECIPE_HEAD + "  - method: rtn\n\tbits: 4\n"),
        message="invalid YAML",
        place="recipe.yaml:5",
    ),
    Fault(
        id="recipe/empty-file",
        description="an empty recipe file",
        setup=recipe_setup(""),
        message="a recipe is a mapping",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/top-level-list",
        description="a list at the top level instead of a mapping",
        setup=recipe_setup("- model: {model}\n- stages: []\n"),
        message="a recipe is a mapping",
        place="recipe.yaml:1:1",
    ),
    Fault(
        id="recipe/scalar",
        description="a recipe that is one word",
        setup=recipe_setup("rtn\n"),
        message="a recipe is a mapping",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/missing-model-key",
        description="no `model:` key",
        setup=recipe_setup("output: {{dir: {out}}}\nstages:\n  - method: rtn\n    bits: 4\n"),
        message="model",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/nothing-to-do",
        description="no stages, no evaluation and no output",
        setup=recipe_setup("model: {model}\n"),
        message="stages",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/negative-samples",
        description="`samples: -4` in a data entry",
        setup=recipe_setup(
            RECIPE_HEAD + "  - method: rtn\n    bits: 4\ndata:\n  calibration: {{path: {text}, samples: -4}}\n"
        ),
        message="samples",
        place="recipe.yaml:7",
    ),
    Fault(
        id="recipe/zero-seq-len",
        description="`seq_len: 0` in a data entry",
        setup=recipe_setup(
            RECIPE_HEAD + "  - method: rtn\n    bits: 4\ndata:\n  calibration: {{path: {text}, seq_len: 0}}\n"
        ),
        message="seq_len",
        place="recipe.yaml:7",
    ),
    Fault(
        id="recipe/unknown-data-source",
        description="`source: csv`, a data source no plugin provides",
        setup=recipe_setup(
            RECIPE_HEAD + "  - method: rtn\n    bits: 4\ndata:\n  calibration: {{path: {text}, source: csv}}\n"
        ),
        message="csv",
        place="recipe.yaml:7",
    ),
    Fault(
        id="recipe/unknown-output-format",
        description="`format: onnx`, a format no writer provides",
        setup=recipe_setup(
            "model: {model}\noutput: {{dir: {out}, format: onnx}}\nstages:\n  - method: rtn\n    bits: 4\n"
        ),
        message="onnx",
        place="recipe.yaml:2",
    ),
    Fault(
        id="recipe/unknown-writer-option",
        description="`shard: 1GB` among the output options",
        setup=recipe_setup(
            "model: {model}\noutput: {{dir: {out}, shard: 1GB}}\nstages:\n  - method: rtn\n    bits: 4\n"
        ),
        message="unknown key 'shard'",
        place="recipe.yaml:2",
    ),
    Fault(
        id="recipe/bad-shard-size",
        description="`max_shard_size: lots`",
        setup=recipe_setup(
            "model: {model}\noutput: {{dir: {out}, max_shard_size: lots}}\nstages:\n  - method: rtn\n    bits: 4\n    group_size: 32\n",
            command="apply",
        ),
        message="max_shard_size",
        place="recipe.yaml:2",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/unknown-metric",
        description="`evaluate: [perplexty]`",
        setup=recipe_setup(RECIPE_HEAD + "  - method: rtn\n    bits: 4\nevaluate: [perplexty]\n"),
        message="unknown metric 'perplexty' (did you mean 'perplexity'?)",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/metric-without-data",
        description="a metric on a data entry the recipe does not define (`data: heldout`)",
        setup=recipe_setup(
            RECIPE_HEAD + "  - method: rtn\n    bits: 4\nevaluate: [{{metric: perplexity, data: heldout}}]\n"
        ),
        message="heldout",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/unknown-device",
        description="`run: {device: tpu}`",
        setup=recipe_setup(RECIPE_HEAD + "  - method: rtn\n    bits: 4\nrun: {{device: tpu}}\n"),
        message="run.device: Value error, must be auto, cpu, cuda or cuda:N",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/unknown-run-mode",
        description="`run: {mode: parallel}`",
        setup=recipe_setup(RECIPE_HEAD + "  - method: rtn\n    bits: 4\nrun: {{mode: parallel}}\n"),
        message="mode",
        place="recipe.yaml:6",
    ),
    Fault(
        id="data/missing-file",
        description="a data entry naming a file that does not exist",
        setup=missing_data_file,
        message="data file not found",
        place="missing.txt",
        must_not_exist=("out",),
    ),
    Fault(
        id="data/path-is-a-directory",
        description="a data entry whose `path:` is a directory",
        setup=data_path_is_a_directory,
        message="texts",
        place="recipe.yaml:",
    ),
    Fault(
        id="recipe/missing-file",
        description="`compress apply` on a recipe file that does not exist",
        setup=missing_recipe,
        message="recipe file not found",
        place="nope.yaml",
    ),
    Fault(
        id="recipe/is-a-directory",
        description="`compress recipe check` on a directory",
        setup=recipe_is_a_directory,
        message="recipe.yaml",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/output-exists",
        description="an existing output directory without `--overwrite`",
        setup=output_exists,
        message="exists (pass --overwrite",
        place="out",
        must_exist=("out/keep.txt",),
    ),
    Fault(
        id="recipe/output-is-the-model",
        description="`output.dir` is the model's own directory, with `--overwrite`",
        setup=output_is_the_model,
        message="is or contains the model",
        place="recipe.yaml:",
        must_exist=("model/model.safetensors", "model/config.json"),
    ),
    Fault(
        id="recipe/output-is-the-working-directory",
        description="`output: {dir: .}` with `--overwrite`",
        setup=output_is_the_working_directory,
        message="is or contains the working directory",
        place="recipe.yaml:",
        must_exist=("notes.txt",),
    ),
    Fault(
        id="recipe/output-holds-the-recipe",
        description="`output.dir` is the directory holding the recipe, with `--overwrite`",
        setup=output_holds_the_recipe,
        message="is or contains the recipe",
        place="sub/recipe.yaml:",
        must_exist=("sub/recipe.yaml",),
    ),
    Fault(
        id="recipe/ignore-everything",
        description="a stage whose `ignore: ['re:.*']` excludes every target",
        setup=stage("method: rtn\n    bits: 4\n    ignore: ['re:.*']\n"),
        message="stage 1 (rtn) selects no module",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/empty-targets",
        description="a stage with `targets: []`",
        setup=stage("method: rtn\n    bits: 4\n    targets: []\n"),
        message="stage 1 (rtn) selects no module",
        place="recipe.yaml:4",
    ),
    Fault(
        id="recipe/target-not-linear",
        description="rtn aimed at the RMSNorm `model.norm`",
        setup=stage("method: rtn\n    bits: 4\n    targets: [model.norm]\n"),
        message="rtn cannot compress model.norm (LlamaRMSNorm)",
        place="recipe.yaml:6",
    ),
    Fault(
        id="recipe/unknown-metric-parameter",
        description="a metric entry with an unknown key (`bogus: 1`)",
        setup=recipe_setup(evaluate=[{"metric": "perplexity", "bogus": 1}]),
        message="unknown key 'bogus'",
        place="recipe.yaml:",
    ),
    Fault(
        id="recipe/unknown-method-listing",
        description="`compress methods rtm`",
        setup=lambda work: ["methods", "rtm"],
        message="unknown method 'rtm' (did you mean 'rtn'?)",
    ),
    Fault(
        id="recipe/large-with-typo",
        description=f"the largest recipe: {LARGE_STAGES} stages x 28 targets, a typo in the last stage",
        setup=recipe_setup(large_recipe_text(LARGE_STAGES, error=True)),
        message="unknown key 'group_sise'",
        place=f"recipe.yaml:{LARGE_ERROR_LINE}:5",
    ),
]
