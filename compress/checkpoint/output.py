"""Writing a run's output directory: the writer plugin's files plus recipe, report and card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from compress.checkpoint import Writer, WriterCapabilities, WriterOptions
from compress.checkpoint.atomic import atomic_directory
from compress.context import Context
from compress.modelcard import model_card


@contextmanager
def output_directory(
    context: Context, writer: Writer, options: BaseModel, recipe_file: Path, overwrite: bool
) -> Iterator[Path]:
    """Write the checkpoint with ``writer`` into a staging directory and yield it.

    The caller may read the checkpoint back (evaluation); afterwards recipe.yaml,
    report.json and the model card are added, with the report as it is then, and the
    directory is renamed into place. Nothing appears if anything raises.
    """
    output = context.recipe.output
    assert output is not None
    with atomic_directory(output.dir, overwrite=overwrite) as staging:
        writer.write(context, staging, options)
        yield staging
        shutil.copyfile(recipe_file, staging / "recipe.yaml")
        (staging / "report.json").write_text(json.dumps(context.report.to_json(), indent=2) + "\n")
        model_card(context, writer, recipe_file.read_text()).save(staging / "README.md")


class DenseWriter:
    """Plain safetensors in the model's dtype, compressed weights stored dequantized.

    Loads anywhere transformers does; takes as much space as the original. Sparse layers
    (``LayerState.sparsity``) keep their zeros and are listed in the compressed-tensors
    ``sparsity_config`` under config.json's ``quantization_config`` (format ``dense``, no
    ``config_groups``): transformers loads the checkpoint as a plain model, and
    ``compress.checkpoint.sparse`` can turn its 2:4 layers into semi-structured kernels.
    Caveat: vLLM from 0.19 on (PR #36799) routes unquantized layers marked 2:4 to its
    ``CompressedTensors24`` scheme, which now raises "Sparse24 models are no longer
    supported by vLLM"; such a checkpoint serves in vLLM only without that entry.
    """

    name = "dense"
    Options = WriterOptions
    capabilities = WriterCapabilities(sparsity=True, outliers=True)
    requantizes = False

    def write(self, context: Context, directory: Path, options: WriterOptions) -> None:
        from compress.checkpoint.sparse import sparse_layers

        model = context.model
        sparsity = None
        if sparse_layers(context.layers):
            from compress.checkpoint.sparse import sparsity_config

            sparsity = sparsity_config(model, context.layers)
        model.save_pretrained(directory, max_shard_size=context.recipe.output.max_shard_size)
        if sparsity is not None:
            from compress.checkpoint.sparse import write_sparsity_config

            write_sparsity_config(directory, sparsity)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)
