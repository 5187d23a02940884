"""The machine rather than the input at fault: an output directory that cannot be created,
a disk without room, a device that is not there, a cache that is not a directory.

What can be known before the run is refused by ``compress recipe check`` and at the start
of ``compress apply``, before the weights are read; a disk that fills during the write is
one line too, with the staging directory removed.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path

from tests.faults.cases_concurrency import BUILTIN, Child
from tests.faults.harness import APPLY, CHECK, Fault, Observed, copy_tiny_model, recipe_setup, write_recipe

UNWRITABLE = "/sys/compress-out"
"""Not creatable, even by root (sysfs refuses new entries); permission bits would not stop root."""
OUTPUT_LINE = "recipe.yaml:16"
"""Where write_recipe's recipe says ``dir:`` under ``output:``."""
WRITE_LIMIT_BYTES = 64 * 1024
"""RLIMIT_FSIZE for the full-disk case: the tiny model's weights (about 360 KB) do not fit."""


def with_output(directory: str, argv: list[str] = CHECK, prepare: Callable[[Path], None] | None = None):
    """A setup writing the tiny recipe with ``output.dir`` set to ``directory``."""

    def setup(work: Path) -> list[str]:
        if prepare is not None:
            prepare(work)
        write_recipe(work, output={"dir": directory})
        return argv

    return setup


def a_file(work: Path) -> None:
    (work / "afile").write_text("not a directory\n")


def huge_model(model: Path) -> None:
    """A config describing ~430 billion parameters, whose dense output would need about
    1.7 TB, over a weights file holding one of its tensors (the checks before the run read
    shapes, never the weights)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=100)
    config.update(num_attention_heads=128, num_key_value_heads=128, head_dim=128)
    (model / "config.json").write_text(json.dumps(config))
    save_file({"model.norm.weight": torch.ones(16384)}, model / "model.safetensors", metadata={"format": "pt"})


def huge_copy(work: Path) -> Path:
    return copy_tiny_model(work, damage=huge_model)


def builtin_model(work: Path) -> list[str]:
    a_file(work)
    write_recipe(work, model=BUILTIN)
    return CHECK


def full_disk(work: Path, argv: list[str]) -> Observed:
    """The run may write files of WRITE_LIMIT_BYTES at most (RLIMIT_FSIZE: a write past it
    fails with EFBIG, as on a full disk); the weights do not fit."""

    def limit_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (WRITE_LIMIT_BYTES, WRITE_LIMIT_BYTES))

    return Child(work, argv, preexec=limit_writes).finish()


CASES = [
    Fault(
        id="environment/output-unwritable-check",
        description=f"`recipe check` with output.dir {UNWRITABLE} (a place nothing can be created in)",
        setup=with_output(UNWRITABLE),
        message="cannot write in /sys",
        place=OUTPUT_LINE,
    ),
    Fault(
        id="environment/output-unwritable-apply",
        description=f"`apply` with output.dir {UNWRITABLE}",
        setup=with_output(UNWRITABLE, APPLY),
        message="cannot write in /sys",
        place=OUTPUT_LINE,
    ),
    Fault(
        id="environment/output-parent-is-file-check",
        description="`recipe check` with output.dir afile/out, afile a file",
        setup=with_output("afile/out", prepare=a_file),
        message="afile is not a directory",
        place=OUTPUT_LINE,
        must_not_exist=("afile/out",),
    ),
    Fault(
        id="environment/output-parent-is-file-apply",
        description="`apply` with output.dir afile/deeper/out, afile a file",
        setup=with_output("afile/deeper/out", APPLY, prepare=a_file),
        message="afile is not a directory",
        place=OUTPUT_LINE,
    ),
    Fault(
        id="environment/output-is-file-overwrite",
        description="`apply --overwrite` with output.dir naming a file",
        setup=with_output("afile", [*APPLY, "--overwrite"], prepare=a_file),
        message="exists and is not a directory",
        place=OUTPUT_LINE,
    ),
    Fault(
        id="environment/no-space-check",
        description="`recipe check` of a model whose output needs ~1.7 TB, more than the disk has",
        setup=recipe_setup(model=huge_copy),
        message="not enough free space",
        place=OUTPUT_LINE,
    ),
    Fault(
        id="environment/no-space-apply",
        description="`apply` of a model whose output needs ~1.7 TB (refused before loading)",
        setup=recipe_setup(command="apply", model=huge_copy),
        message="not enough free space",
        place=OUTPUT_LINE,
        must_not_exist=("out",),
    ),
    Fault(
        id="environment/full-disk-during-write",
        description=f"`apply` whose writes fail past {WRITE_LIMIT_BYTES // 1024} KB (RLIMIT_FSIZE, EFBIG)",
        setup=recipe_setup(command="apply", evaluate=[]),
        action=full_disk,
        message="cannot write the output: File too large",
        place="out",
        must_not_exist=("out",),
    ),
    Fault(
        id="environment/cuda-missing",
        description="`recipe check` with run: {device: cuda} where no CUDA device is visible",
        setup=recipe_setup(run={"device": "cuda"}),
        env={"CUDA_VISIBLE_DEVICES": ""},
        subprocess=True,
        message="device 'cuda' is not available",
        place="recipe.yaml:",
    ),
    Fault(
        id="environment/cuda-index-beyond",
        description="`apply` with run: {device: 'cuda:99'}",
        setup=recipe_setup(command="apply", run={"device": "cuda:99"}),
        message="device 'cuda:99' is not available",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="environment/cache-is-file",
        description="COMPRESS_CACHE naming a file, recipe on the built-in smollm2-135m-instruct",
        setup=builtin_model,
        env={"COMPRESS_CACHE": "{work}/afile"},
        message="COMPRESS_CACHE is not a directory",
        place="recipe.yaml:1",
    ),
    Fault(
        id="environment/cache-parent-is-file",
        description="COMPRESS_CACHE=afile/cache, afile a file, recipe on the built-in model",
        setup=builtin_model,
        env={"COMPRESS_CACHE": "{work}/afile/cache"},
        message="Not a directory",
        place="recipe.yaml:1",
    ),
    Fault(
        id="environment/cache-unwritable",
        description="COMPRESS_CACHE in a place nothing can be created in, recipe on the built-in model",
        setup=builtin_model,
        env={"COMPRESS_CACHE": "/sys/compress-cache"},
        message="cannot create the directory",
        place="recipe.yaml:1",
    ),
]
