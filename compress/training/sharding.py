"""FSDP for training stages: the model sharded per decoder block over the processes (torch's
FSDP2, ``fully_shard``), sharded training checkpoints, and the trained model gathered one
block at a time for the writer.

Launched with ``accelerate launch --use_fsdp`` (or any launcher with ``ACCELERATE_USE_FSDP=true``)
and more than one process, a training stage shards instead of onloading: each decoder
block, then the embeddings with the final norm and the head, then the root, each its own
FSDP2 unit, as accelerate's ``fsdp2_prepare_model`` groups them (``reshard_after_forward``
on for the blocks, off for the tail). ``fully_shard`` moves each unit's parameters to the
device as it shards them, so a device never holds more than one whole block of the model.

Why torch's ``fully_shard`` directly and not ``Accelerator.prepare`` with accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)``: accelerate 1.15 switches to FSDP only
for GPU-like backends (``AcceleratorState`` sets ``DistributedType.FSDP`` in its multi-GPU
branch; two CPU processes silently get DDP instead), and its FSDP2 prepare maps every
optimizer parameter to a model parameter, so a method's parameters outside the model
(distillation's hidden-state projections) raise. Applying the same grouping here runs the
same code on two CPU processes (gloo, the tests) and on GPUs (NCCL); the accelerator still
owns the process group, the RNG state and the trackers.

Loading: under FSDP over several processes, a model read from safetensors (the run's, its
reference, a teacher) is loaded as ``run: mode: lazy`` loads it (:func:`load_for_run`): a
skeleton on the meta device, its shards memory-mapped. :func:`shard_model` shards the
skeleton, allocates each process's shards on the device and fills them straight from the
mapped files, each process reading only its rows of each tensor (``fully_shard`` shards
dim 0), one tensor at a time: no host holds more than one tensor's rows, whatever the
depth of the model.

Memory: the trained parameters (fp32 masters), their gradients and the optimizer state
exist only as shards; frozen parameters are sharded too, in their loaded dtype. A frozen
model a method computes with (a distillation teacher) is sharded the same way through
:func:`frozen_placed`, never whole on a device. A model a loader gives whole (one without
safetensors shards) is loaded whole on every host first, and freed as it is sharded.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.blocks import find_blocks, outside_blocks
from compress.devices import onloaded
from compress.distributed import fsdp_requested

if TYPE_CHECKING:
    from compress.checkpoint import LoadedModel, Loader
    from compress.checkpoint.lazy import LazyWeights
    from compress.host import PluginHost
    from compress.method import Method
    from compress.recipe import ModelSpec, Recipe

SHARDED_STATE = "sharded"
"""The folder of a training checkpoint holding the model's and optimizer's shards (torch.distributed.checkpoint)."""


def sharding_active() -> bool:
    """Whether training stages shard: FSDP asked for and more than one process."""
    import torch.distributed as dist

    return fsdp_requested() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_UNREAD: weakref.WeakKeyDictionary[nn.Module, LazyWeights] = weakref.WeakKeyDictionary()
"""Models loaded on the meta device by :func:`load_for_run`, with the checkpoint :func:`shard_model` fills them from."""


def loads_lazily(host: PluginHost, recipe: Recipe, loader: Loader) -> bool:
    """Whether the run's models (its own, its reference, a teacher) that ``loader`` reads are
    loaded weightless, for :func:`shard_model` to fill: FSDP asked for over more than one
    process (the launcher's ``WORLD_SIZE``; the process group starts with the training
    stage), a loader that reads safetensors, and a plan whose first stage trains (the stage
    that shards the model; a plan that starts otherwise runs whole on every process)."""
    from compress.training.method import TrainingMethod

    if not (fsdp_requested() and int(os.environ.get("WORLD_SIZE") or 1) > 1 and _reads_shards(loader)):
        return False
    first = host.methods().get(recipe.stages[0].method) if recipe.stages else None
    return isinstance(first, type) and issubclass(first, TrainingMethod)


def _reads_shards(loader: object) -> bool:
    return hasattr(loader, "weights_directory")


def load_for_run(host: PluginHost, recipe: Recipe, loader: Loader, spec: ModelSpec) -> LoadedModel:
    """``spec``'s model as ``loader`` gives it, or, when :func:`loads_lazily`, weightless
    (:func:`load_unread`)."""
    return load_unread(loader, spec) if loads_lazily(host, recipe, loader) else loader.load(spec)


def load_unread(loader: Loader, spec: ModelSpec) -> LoadedModel:
    """``spec``'s model as a skeleton on the meta device whose weights stay in the memory-mapped
    shards (every shard checked now) until :func:`shard_model` reads each process's rows."""
    from compress.checkpoint.lazy import open_lazy

    loaded, weights = open_lazy(loader, spec)
    _UNREAD[loaded.model] = weights
    return loaded


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(
    model: nn.Module, device: torch.device, frozen: bool = False, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard ``model`` in place over every process: one FSDP2 unit per decoder block, one for the
    embeddings, final norm and head, one for the rest (the root). Returns ``model``.

    With ``compute_dtype`` (bf16 training), FSDP gathers the parameters in that dtype for the
    forward and backward passes and reduces the gradients in fp32 into the fp32 shards
    (``MixedPrecisionPolicy``): half the traffic and memory of gathering fp32 masters.

    The tail unit stays gathered between the forward and the backward pass of a trained model
    (its backward starts at once); a ``frozen`` model, which has no backward pass, reshards
    every unit after its forward pass."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=None if compute_dtype is None else torch.float32
    )
    blocks_name, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    tail = [module for module in outside_blocks(model, blocks_name) if any(True for _ in module.parameters())]
    if tail:  # tied embeddings and head must be one unit: a shared parameter may belong to one group only
        fully_shard(tail, mesh=mesh, reshard_after_forward=frozen, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=frozen or None, mp_policy=policy)
    weights = _UNREAD.pop(model, None)
    if weights is not None:
        _fill_local_shards(model, weights, device)
    return model


def _fill_local_shards(model: nn.Module, weights: LazyWeights, device: torch.device) -> None:
    """Allocate the sharded meta ``model``'s local shards on ``device`` and read them from the
    checkpoint: of each parameter, the rows of dim 0 this process holds (``fully_shard``
    splits dim 0 as ``torch.chunk`` does), cast to the loaded dtype, then to the parameter's
    (fp32 for trained masters, as the eager path upcasts the loaded weights). Buffers are real
    on the skeleton (rotary tables) and are kept across the allocation."""
    from torch.distributed.tensor import DTensor, Shard

    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers.pop(name))
        for name, parameter in model.named_parameters():
            local = parameter
            start = 0
            if isinstance(parameter, DTensor):
                local = parameter.to_local()
                (placement,) = parameter.placements
                assert placement == Shard(0), f"{name}: FSDP2 shards dim 0, not {placement}"
                rank, processes = parameter.device_mesh.get_local_rank(), parameter.device_mesh.size()
                start = min(rank * -(-parameter.shape[0] // processes), parameter.shape[0])
            local.copy_(weights.read_rows(name, tuple(parameter.shape), start, start + local.shape[0]))


@contextmanager
def frozen_placed(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """A frozen model a training method computes with (e.g. a distillation teacher), in eval mode
    without gradients: onloaded whole to ``device`` (and back afterwards), or, when training
    stages shard (:func:`sharding_active`), sharded per block over the processes like the
    trained model, so no device holds it whole. A sharded model stays sharded: it is the
    run's, and a sharded run ends with its training stage."""
    module.eval().requires_grad_(False)
    if not sharding_active():
        with onloaded(module, device):
            yield module
        return
    if not is_sharded(module):
        shard_model(module, device, frozen=True)
    yield module


def gathered_units(
    model: nn.Module, wanted: dict[str, torch.dtype]
) -> Iterator[tuple[str, dict[str, torch.Tensor] | None]]:
    """The sharded ``model``'s tensors named in ``wanted`` one unit at a time (each block, then
    each module outside the blocks), each cast on its device to the dtype ``wanted`` gives
    before it is copied to the host: ``(unit name, {full name: host tensor})`` on the main
    process, ``(unit name, None)`` on the others. Every process must consume the whole
    iterator: each parameter is an all-gather."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    blocks_name, blocks = find_blocks(model)
    units = [(f"{blocks_name}.{index}", block) for index, block in enumerate(blocks)]
    names = {id(module): name for name, module in model.named_modules()}
    units += [(names[id(module)], module) for module in outside_blocks(model, blocks_name)]
    for unit, module in units:
        tensors = {}
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            full_name = f"{unit}.{name}"
            if full_name not in wanted:
                continue
            full = tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
            if main:
                tensors[full_name] = full.to(wanted[full_name]).to("cpu")
            del full
        yield unit, tensors if main else None


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the model's and optimizer's shards into ``directory`` (every process writes its own).
    The optimizer's parameters outside the model are left out: they are whole on every
    process, and the caller keeps them (and their optimizer state) with the rest of its state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with _model_parameters_only(model, optimizer):
        model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read shards :func:`save_sharded` wrote with the same number of processes into the model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with _model_parameters_only(model, optimizer):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


@contextmanager
def _model_parameters_only(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The optimizer without its parameters outside ``model`` (and their state) for the duration:
    torch's sharded state dicts name every optimizer parameter by its place in the model."""
    own = {id(parameter) for parameter in model.parameters()}
    groups = [group["params"] for group in optimizer.param_groups]
    aside = {
        p: optimizer.state.pop(p) for params in groups for p in params if id(p) not in own and p in optimizer.state
    }
    for group, params in zip(optimizer.param_groups, groups):
        group["params"] = [p for p in params if id(p) in own]
    try:
        yield
    finally:
        for group, params in zip(optimizer.param_groups, groups):
            group["params"] = params
        optimizer.state.update(aside)


def clip_sharded(parameters: list[nn.Parameter], max_norm: float | None, max_value: float | None) -> None:
    """Clip gradients by value, then by the norm over all of them, where some are DTensor shards
    (the model's) and some plain tensors (a method's parameters outside the model):
    torch's clipping functions take one kind at a time."""
    from torch.distributed.tensor import DTensor

    kinds = [
        [p for p in parameters if p.grad is not None and isinstance(p, DTensor)],
        [p for p in parameters if p.grad is not None and not isinstance(p, DTensor)],
    ]
    kinds = [kind for kind in kinds if kind]
    if max_value is not None:
        for kind in kinds:
            torch.nn.utils.clip_grad_value_(kind, max_value)
    if max_norm is None or not kinds:
        return
    norms = []
    for kind in kinds:
        norm = torch.nn.utils.get_total_norm([p.grad for p in kind])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([norm.float() for norm in norms]))
    for kind in kinds:
        torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total)


def fsdp_refusal(
    methods: list[Method], targets: list[list[str]], writer: object | None, evaluates: bool, loader: object
) -> tuple[str, tuple]:
    """Why a run launched with FSDP cannot run this plan (the stages' ``methods`` and the module
    names each targets, the model's ``loader``), and the recipe key to point at; ``("", ())`` if it can."""
    from compress.training.method import TrainingMethod

    trained = [index for index, method in enumerate(methods) if isinstance(method, TrainingMethod)]
    if not trained:
        return "", ()
    last = trained[0]
    if len(methods) > last + 1:
        return (
            f"FSDP (ACCELERATE_USE_FSDP) leaves the model sharded after training stage {last + 1} "
            f"({methods[last].name}) and writes it shard by shard, so no stage may follow it",
            ("stages", last + 1, "method"),
        )
    method = methods[last]
    where = ("stages", last, "method")
    if method.fsdp_refusal:
        return f"FSDP (ACCELERATE_USE_FSDP): {method.name} cannot train sharded: {method.fsdp_refusal}", where
    if not method.straight_through:
        return (
            f"FSDP (ACCELERATE_USE_FSDP): {method.name} cannot train sharded: it moves its own grids or masks "
            "over whole weights, which FSDP holds as shards",
            where,
        )
    for index, earlier in enumerate(methods[:last]):
        produced = earlier.produces()
        shared = sorted(set(targets[index]) & set(targets[last]))
        if shared and (produced.quant is not None or produced.sparsity is not None):
            return (
                f"FSDP (ACCELERATE_USE_FSDP): {method.name} cannot train sharded through the grids or masks that "
                f"stage {index + 1} ({earlier.name}) leaves in {shared[0]} (the straight-through path needs whole "
                "weights); train without --use_fsdp, or leave those layers out of one stage",
                where,
            )
    if last > 0 and _reads_shards(loader):
        return (
            f"FSDP (ACCELERATE_USE_FSDP) leaves the weights in their memory-mapped shards until the training "
            f"stage shards them, so stage 1 ({methods[0].name}) cannot change them first (it would hold every "
            "block it changes whole on each process's host); run the stages before the training stage in "
            "their own `compress apply` without FSDP (output: format: dense) and train its output",
            ("stages", 0, "method"),
        )
    if evaluates:
        return (
            "FSDP (ACCELERATE_USE_FSDP) never gathers the whole model on one process, so it cannot evaluate: "
            "drop evaluate: and run `compress eval` on the output",
            ("evaluate",),
        )
    if writer is not None and not hasattr(writer, "stored_tensors"):
        name = getattr(writer, "name", "?")
        return f"FSDP (ACCELERATE_USE_FSDP) writes the model block by block, which output format {name!r} cannot", (
            "output",
            "format",
        )
    return "", ()
