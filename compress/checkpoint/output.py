"""Writing a run's output directory: the writer plugin's files plus recipe, report and card."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from compress.checkpoint import Writer, WriterCapabilities
from compress.checkpoint.atomic import atomic_directory, prepare_parent, remove_stale
from compress.checkpoint.dtypes import StoredDtypeOptions, cast_floating, record_dtype, stored_dtype
from compress.context import Context
from compress.distributed import is_main_process
from compress.errors import UserError
from compress.locks import LockBusy, locked, running_holder
from compress.modelcard import model_card
from compress.plots import LOSS_CURVE_FILE, write_loss_curve
from compress.recipe import OutputSpec


@contextmanager
def output_directory(context: Context, writer: Writer, recipe_text: str, overwrite: bool) -> Iterator[Path]:
    """Yield the staging directory of the run's output, for the caller to write the checkpoint
    into with ``writer`` (and read it back, for evaluation).

    Afterwards recipe.yaml (``recipe_text``, the recipe as run), the stages' files,
    report.json, the loss-curve plot (when a stage trained) and the model card are added,
    with the report as it is then, and the directory is renamed into place. Nothing appears
    if anything raises.
    """
    output = context.recipe.output
    assert output is not None
    with atomic_directory(output.dir, overwrite=overwrite) as staging:
        yield staging
        (staging / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        for name, content in context.files.items():
            (staging / name).write_bytes(content)
        report = context.report.to_json()
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_loss_curve(report["stages"], staging / LOSS_CURVE_FILE)
        model_card(context, writer, recipe_text).save(staging / "README.md")


def writable_place(target: Path) -> Path:
    """The existing directory ``target`` will be created in (its parent or the nearest
    existing ancestor); a UserError when a file is in the way or nothing can be created there.

    Tried by creating and removing an empty directory: permission bits do not tell, for
    root or on a read-only mount.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError("exists and is not a directory", str(target))
    place = next(path for path in [target.parent, *target.parent.parents] if path.exists() or path.is_symlink())
    if not place.is_dir():
        raise UserError(f"{place} is not a directory", str(target))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=place))
    except OSError as error:
        raise UserError(f"cannot write in {place}: {error.strerror}", str(target)) from None
    return place


def estimated_output_bytes(model: nn.Module, quantized: dict[str, int], writer: Writer, itemsize: int) -> int:
    """About how many bytes ``writer`` needs for ``model`` (a weightless copy is enough).

    Every parameter counts at ``itemsize`` bytes, except the weights of the modules in
    ``quantized`` (module name to weight bits), which count at their bits when the format
    stores grids (every format but dense, which stores them dequantized); a format that
    applies its own quantization (``requantizes``) counts Linear weights at 4 bits, its least.
    Scales and zero points are left out: this is a lower bound, which refuses only runs that
    cannot fit.
    """
    total = 0.0
    seen: set[int] = set()  # tied weights (embeddings and LM head) are stored once
    for name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            bits = itemsize * 8
            if parameter_name == "weight" and name in quantized and not isinstance(writer, DenseWriter):
                bits = quantized[name]
            elif parameter_name == "weight" and writer.requantizes and isinstance(module, nn.Linear):
                bits = 4
            total += parameter.numel() * bits / 8
    return int(total)


def check_output_place(target: Path, needed: int) -> None:
    """Refuse an output directory that another run is writing, that cannot be created, or
    whose disk lacks ``needed`` bytes."""
    running = running_holder(Path(target)) if is_main_process() else None
    if running is not None:
        raise UserError(f"another compress run (pid {running}) is writing this output directory", str(target))
    place = writable_place(target)
    free = shutil.disk_usage(place).free
    if needed > free:
        need, have = f"{needed / 1e9:,.1f} GB", f"{free / 1e9:,.1f} GB"
        if need == have:  # a near miss: the rounded figures alone would not say which is larger
            need, have = f"{need} ({needed:,} bytes)", f"{have} ({free:,} bytes)"
        raise UserError(f"not enough free space: the output needs about {need}, {place} has {have}", str(target))


def dtype_itemsize(dtype: object) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name; float32 when unknown."""
    found = getattr(torch, str(dtype).removeprefix("torch."), None) if dtype is not None else None
    return found.itemsize if isinstance(found, torch.dtype) else 4


@contextmanager
def output_reserved(output: OutputSpec | None, overwrite: bool) -> Iterator[None]:
    """Hold the lock on the run's output directory for the whole run (main process only).

    A second run on the same directory is refused at once, naming the process that holds
    it; what killed runs left beside it is removed; the directory found existing (a run
    that finished meanwhile) is refused without ``overwrite``. Parent directories created
    for the lock are removed again if the run fails before writing.
    """
    if output is None or not is_main_process():
        yield
        return
    target = Path(output.dir)
    created = prepare_parent(target)
    try:
        with ExitStack() as stack:
            try:
                stack.enter_context(locked(target, wait=False))
            except LockBusy as busy:
                holder = f"pid {busy.holder}" if busy.holder else "another process"
                raise UserError(
                    f"another compress run ({holder}) is writing this output directory", str(target)
                ) from None
            remove_stale(target)
            if target.exists() and not overwrite:
                raise UserError("output directory exists (pass --overwrite to replace it)", str(target))
            yield
    except BaseException:
        for directory in reversed(created):
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise


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
    Activation points (``Context.points``) are kept as ``activation_points.json`` (which
    points a runtime must quantize, on what grid) and ``activation_points.safetensors``
    (their scales); transformers ignores both and runs the weights unquantized in between.
    """

    name = "dense"
    Options = StoredDtypeOptions
    capabilities = WriterCapabilities(sparsity=True, outliers=True, activation_points=True)
    requantizes = False

    def write(self, context: Context, directory: Path, options: StoredDtypeOptions) -> None:
        from compress.checkpoint.sparse import sparse_layers

        model = context.model
        sparsity = None
        if sparse_layers(context.layers):
            from compress.checkpoint.sparse import sparsity_config

            sparsity = sparsity_config(model, context.layers)
        dtype = stored_dtype(options, model)
        state_dict = self.stored_tensors(context, "", model, options)
        model.save_pretrained(directory, state_dict=state_dict, max_shard_size=context.recipe.output.max_shard_size)
        record_dtype(directory, dtype)
        if sparsity is not None:
            from compress.checkpoint.sparse import write_sparsity_config

            write_sparsity_config(directory, sparsity)
        if context.points:
            from compress.activation_points import points_files

            for name, content in points_files(context.points).items():
                (directory / name).write_bytes(content)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)

    def stored_tensors(
        self, context: Context, prefix: str, module: nn.Module, options: StoredDtypeOptions
    ) -> dict[str, torch.Tensor]:
        """The tensors stored for ``module`` (the model's submodule named ``prefix``), by full name."""
        return cast_floating(prefixed(module.state_dict(), prefix), stored_dtype(options, context.model))

    def write_metadata(self, context: Context, directory: Path, options: StoredDtypeOptions) -> None:
        """What goes beside streamed shards (``run: mode: lazy``, :mod:`compress.checkpoint.stream`)."""
        save_metadata(context, directory, stored_dtype(options, context.model))


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with their names under the module ``prefix`` (unchanged for the empty prefix)."""
    return {f"{prefix}.{key}" if prefix else key: value for key, value in tensors.items()}


def save_metadata(context: Context, directory: Path, dtype: torch.dtype) -> None:
    """config.json naming the model's class and the stored ``dtype``, generation_config.json
    when the model has one, and the tokenizer: what ``save_pretrained`` writes besides weights."""
    model = context.model
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    record_dtype(directory, dtype)
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(directory)
    if context.tokenizer is not None:
        context.tokenizer.save_pretrained(directory)
