"""``run: mode: lazy``: compress a model larger than host memory, one block read from its
shards, compressed and written at a time.

The model is a weightless skeleton (:func:`compress.checkpoint.lazy.empty_model`); the
modules outside the blocks (embeddings, final norm, head) are read onto the host once,
since their size does not grow with depth; each block is read from the memory-mapped
shards onto the compute device (one tensor at a time through the host), goes through
every stage, feeds the next block's calibration inputs, is handed to the writer's shard
stream (:class:`compress.checkpoint.stream.ShardSink`) and emptied again. Host memory
holds the outside modules, one block, the calibration activations and at most one
pending shard, whatever the number of blocks.

The stages run block by block, all stages on one block before the next block: for the
plans allowed here (data-free stages, then at most one calibration stage, last, on
layers no earlier stage touched) that is
the same computation as stage by stage, because a data-free stage reads no activations
and the calibration stage sees each block's inputs from the blocks before it, which
every stage has finished. :func:`lazy_refusal` refuses the other plans at
``compress recipe check``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from compress.blocks import capture_block_inputs, find_blocks, outside_blocks, run_block, within
from compress.checkpoint.lazy import LazyWeights
from compress.checkpoint.stream import ShardSink
from compress.context import Context, StageRun
from compress.method import BlockMethod, BlockWork, LayerMethod, Method
from compress.sequential import compress_after_blocks, compress_layers_after_blocks


def lazy_refusal(
    methods: list[Method], targets: list[list[str]], writer: object | None, loader: object, evaluates: bool
) -> tuple[str, tuple]:
    """Why ``run: mode: lazy`` cannot run this plan (the stages' ``methods`` and the module
    names each targets), and the recipe key to point at; ``("", ())`` if it can."""
    if not hasattr(loader, "weights_directory"):
        return f"run: mode: lazy reads safetensors checkpoints; the {loader.name} loader gives none", ("model",)
    if writer is None:
        return "run: mode: lazy writes the output as it goes: it needs output:", ("run", "mode")
    if not hasattr(writer, "stored_tensors"):
        return f"run: mode: lazy streams shards, which output format {writer.name!r} cannot", ("output", "format")
    if evaluates:
        return (
            "run: mode: lazy never holds the whole model, so it cannot evaluate: drop evaluate: "
            "and run `compress eval` on the output",
            ("evaluate",),
        )
    calibrated = None
    for index, method in enumerate(methods):
        where = ("stages", index, "method")
        if not isinstance(method, (LayerMethod, BlockMethod)):
            return f"run: mode: lazy runs data-free and calibration methods, not {method.kind} ({method.name})", where
        reads_original = method.reads_original_model()
        if reads_original:
            return (
                f"run: mode: lazy never loads the whole model, so {method.name} cannot read the original one "
                f"({reads_original}); use mode: sequential",
                where,
            )
        if calibrated is not None:
            return (
                f"run: mode: lazy runs all stages on one block at a time, so no stage may follow the calibration "
                f"stage {calibrated + 1}",
                where,
            )
        produced = method.produces()
        if produced.sparsity is not None or getattr(produced, "activation_points", None):
            return f"run: mode: lazy writes weight grids and dense weights only, not what {method.name} leaves", where
        if isinstance(method, BlockMethod):
            if method.needs_original_inputs or method.needs_output_gradients:
                return f"run: mode: lazy cannot give {method.name} the whole model's passes it needs", where
            earlier = {name for names in targets[:index] for name in names}
            shared = [name for name in targets[index] if name in earlier]  # in module order
            if shared:
                return (
                    f"run: mode: lazy starts stage {index + 1} ({method.name}) on a block as soon as the earlier "
                    f"stages finish that block, so it cannot follow them on the same layers ({shared[0]})",
                    where,
                )
            calibrated = index
    return "", ()


@dataclass
class LazyRun:
    """What one lazy pass holds: the weights, the shard stream and the stages' own timings."""

    weights: LazyWeights
    sink: ShardSink
    store: Callable[[str, nn.Module], dict[str, torch.Tensor]]
    """The writer's stored tensors of a submodule, by its name."""
    seconds: dict[int, float] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)
    """Names of tied parameters after the first (``save_pretrained`` stores a tied weight once)."""

    def find_aliases(self, model: nn.Module) -> None:
        """Note the model's tied parameters (once the stages have untied what they compress)."""
        first: dict[int, str] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(parameter), name) != name:
                self.aliases.add(name)

    def write(self, context: Context, name: str, module: nn.Module) -> None:
        """Stream ``module``'s stored tensors, less the aliases of tied weights; then keep only
        the shapes of its layers' grids (the scales are in the shards now, and would
        otherwise pile up on the host block after block)."""
        tensors = self.store(name, module)
        self.sink.add({key: tensor for key, tensor in tensors.items() if key not in self.aliases})
        for layer, state in context.layers.items():
            if within(layer, name) and state.quant is not None:
                context.layers[layer] = replace(state, quant=state.quant.to("meta"))


def compress_lazily(context: Context, runs: list[StageRun], lazy: LazyRun) -> None:
    """Every stage of ``runs`` over the model, block by block from the shards (see the module docstring)."""
    model = context.model
    device = context.device
    blocks_name, blocks = find_blocks(model)
    lazy.find_aliases(model)
    outside = {
        name: module
        for name, module in model.named_modules()
        if any(module is o for o in outside_blocks(model, blocks_name))
    }
    for name, module in outside.items():
        lazy.weights.load(module, name, torch.device("cpu"))
    calibration = next((run for run in runs if isinstance(run.method, BlockMethod)), None)
    inputs, returns_tuple = [], False
    if calibration is not None:
        inputs = capture_block_inputs(model, blocks, blocks_name, context.data("calibration"), device)
    for index, block in enumerate(blocks):
        block_name = f"{blocks_name}.{index}"
        with lazy.weights.materialized(block, block_name, device):
            for run in runs:
                started = time.perf_counter()
                in_block = {n: m for n, m in run.targets.items() if within(n, block_name)}
                if isinstance(run.method, BlockMethod):
                    work = BlockWork(block_name, index, block, in_block, inputs, device)
                    run.record.layers.update(run.method.compress_block(context, work))
                else:
                    for name, module in in_block.items():
                        run.record.layers[name] = run.method.compress_layer(context, name, module)
                lazy.seconds[run.index] = lazy.seconds.get(run.index, 0.0) + time.perf_counter() - started
                context.host.hook.compress_block_done(
                    context=context, stage=run.stage, block_name=block_name, block_index=index, num_blocks=len(blocks)
                )
            if calibration is not None:
                inputs, returns_tuple = run_block(block, inputs, device)
            lazy.write(context, block_name, block)
    for run in runs:
        started = time.perf_counter()
        if isinstance(run.method, BlockMethod):
            compress_after_blocks(context, run, run.method.compress_block, inputs, None, returns_tuple)
        else:
            compress_layers_after_blocks(context, run, run.method.compress_layer)
        lazy.seconds[run.index] = lazy.seconds.get(run.index, 0.0) + time.perf_counter() - started
    for name, module in outside.items():
        lazy.write(context, name, module)
        lazy.weights.release(module, name)
