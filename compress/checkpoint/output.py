"""Writing a run's output directory: the writer plugin's files plus recipe, report and card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from compress.checkpoint import WriterCapabilities, WriterOptions
from compress.checkpoint.atomic import atomic_directory
from compress.context import Context
from compress.modelcard import model_card


@contextmanager
def output_directory(context: Context, recipe_file: Path, options: BaseModel, overwrite: bool) -> Iterator[Path]:
    """Write the checkpoint into a staging directory and yield it.

    The caller may read the checkpoint back (evaluation); afterwards recipe.yaml,
    report.json and the model card are added, with the report as it is then, and the
    directory is renamed into place. Nothing appears if anything raises.
    """
    output = context.recipe.output
    assert output is not None
    writer = context.host.writers()[output.format]
    with atomic_directory(output.dir, overwrite=overwrite) as staging:
        writer.write(context, staging, options)
        yield staging
        shutil.copyfile(recipe_file, staging / "recipe.yaml")
        (staging / "report.json").write_text(json.dumps(context.report.to_json(), indent=2) + "\n")
        model_card(context, recipe_file.read_text()).save(staging / "README.md")


class DenseWriter:
    """Plain safetensors in the model's dtype, compressed weights stored dequantized.

    Loads anywhere transformers does; takes as much space as the original.
    """

    name = "dense"
    Options = WriterOptions
    capabilities = WriterCapabilities(sparsity=True)
    requantizes = False

    def write(self, context: Context, directory: Path, options: WriterOptions) -> None:
        model = context.model
        model.save_pretrained(directory, max_shard_size=context.recipe.output.max_shard_size)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)
