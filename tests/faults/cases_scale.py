"""Scale: ``run: {mode: lazy}`` plans it cannot run, shards missing or truncated under it,
and FSDP asked for a plan a sharded training stage cannot run. All one line, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import Fault, copy_tiny_model, data_entry, recipe_setup

LAZY = {"device": "cpu", "mode": "lazy"}


def sharded(damage: Callable[[Path], None]) -> Callable[[Path], Path]:
    """The tiny model saved again in shards of 60 KB, its second shard then damaged."""

    def model(work: Path) -> Path:
        from transformers import AutoModelForCausalLM

        copy = copy_tiny_model(work)
        loaded = AutoModelForCausalLM.from_pretrained(copy)
        (copy / "model.safetensors").unlink()
        loaded.save_pretrained(copy, max_shard_size="60KB")
        damage(sorted(copy.glob("model-*.safetensors"))[1])
        return copy

    return model


def truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-100])


DISTILL = {"method": "distill", "steps": 2, "batch_size": 2}


def fsdp_fault(slug: str, plan: str, stages: list[dict], message: str, evaluate: list | None = None) -> Fault:
    """``recipe check`` of ``stages`` under ``ACCELERATE_USE_FSDP=true`` (accelerate launch --use_fsdp)."""
    names = ("train", "evaluation") if evaluate else ("train",)
    return Fault(
        id=f"scale/fsdp-{slug}",
        description=f"`ACCELERATE_USE_FSDP=true` (accelerate launch --use_fsdp) with {plan}",
        setup=recipe_setup(
            evaluate=evaluate or [], data=lambda _work: {name: data_entry() for name in names}, stages=stages
        ),
        env={"ACCELERATE_USE_FSDP": "true"},
        message=message,
        place="recipe.yaml:",
        must_not_exist=("out",),
    )


CASES = [
    Fault(
        id="scale/lazy-with-evaluate",
        description="`run: {mode: lazy}` with `evaluate: [perplexity]` (the whole model is never held)",
        setup=recipe_setup(run=LAZY),
        message="run: mode: lazy never holds the whole model, so it cannot evaluate",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="scale/lazy-with-training",
        description="`run: {mode: lazy}` with a distill stage",
        setup=recipe_setup(
            run=LAZY,
            evaluate=[],
            stages=[{"method": "distill", "steps": 2, "batch_size": 2}],
            data=lambda _work: {"train": data_entry()},
        ),
        message="runs data-free and calibration methods, not training (distill)",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="scale/lazy-gptq-target-original",
        description="`run: {mode: lazy}` with a gptq stage of `target: original`, which reads the whole original model",
        setup=recipe_setup(
            run=LAZY,
            evaluate=[],
            stages=[{"method": "gptq", "bits": 4, "group_size": 32, "target": "original"}],
        ),
        message="run: mode: lazy never loads the whole model, so gptq cannot read the original one (target: original)",
        place="recipe.yaml:12:11",
        must_not_exist=("out",),
    ),
    Fault(
        id="scale/lazy-missing-shard",
        description="`apply` in lazy mode of a sharded checkpoint whose index names a shard that was deleted",
        setup=recipe_setup(command="apply", run=LAZY, evaluate=[], model=sharded(Path.unlink)),
        message="model-00002-of-",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="scale/lazy-truncated-shard",
        description="`apply` in lazy mode of a sharded checkpoint whose second shard lost its last 100 bytes",
        setup=recipe_setup(command="apply", run=LAZY, evaluate=[], model=sharded(truncate)),
        message="model-00002-of-",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    fsdp_fault(
        "training-stage",
        "a distill stage training the layers an rtn stage quantized (straight-through needs whole weights)",
        [{"method": "rtn", "bits": 4, "group_size": 32}, DISTILL],
        "distill cannot train sharded through the grids or masks that stage 1 (rtn) leaves in",
    ),
    fsdp_fault(
        "stage-before-training",
        "an rtn stage on the attention before a distill stage on the MLPs (the weights stay in their shards)",
        [
            {"method": "rtn", "bits": 4, "group_size": 32, "targets": [r"re:.*self_attn\..*_proj$"]},
            {**DISTILL, "targets": [r"re:.*mlp\..*_proj$"]},
        ],
        "leaves the weights in their memory-mapped shards until the training stage shards them, so stage 1 (rtn)",
    ),
    fsdp_fault(
        "srste",
        "an srste stage (its N:M mask parametrization needs whole weights)",
        [{"method": "srste", "steps": 2, "batch_size": 2}],
        "srste cannot train sharded: it attaches its N:M mask parametrization to whole weights",
    ),
    fsdp_fault(
        "stage-after-training",
        "an rtn stage after a distill stage (the model stays sharded)",
        [DISTILL, {"method": "rtn", "bits": 4, "group_size": 32}],
        "so no stage may follow it",
    ),
    fsdp_fault(
        "with-evaluate",
        "a distill stage and `evaluate: [perplexity]`",
        [DISTILL],
        "FSDP (ACCELERATE_USE_FSDP) never gathers the whole model on one process, so it cannot evaluate",
        evaluate=["perplexity"],
    ),
]
