"""A checkpoint's weights read on demand: a weightless model whose modules are filled from
the safetensors shards one subtree (a block) at a time, and emptied again afterwards.

``run: mode: lazy`` compresses models larger than host memory with this: the model is a
skeleton on the meta device (accelerate's ``init_empty_weights``, so non-persistent buffers
such as rotary tables stay real), and :meth:`LazyWeights.materialized` reads one block's
tensors from the memory-mapped shards (``safe_open``), one tensor at a time through host
memory onto the compute device, for as long as the engine works on it. A shard handle lives only while a subtree is read,
so the mapped pages are released with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig

from compress.checkpoint import LoadedModel, Loader
from compress.checkpoint.loaders import AUTO_CLASSES
from compress.errors import UserError, one_line
from compress.recipe import ModelSpec


def empty_model(config: PretrainedConfig, task: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with its parameters on the meta device (buffers real), tied weights
    tied, in eval mode: what :class:`LazyWeights` fills."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AUTO_CLASSES[task].from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model.eval()


def shard_map(directory: Path) -> dict[str, Path]:
    """Which shard holds each tensor: from ``model.safetensors.index.json`` when there is one
    (every shard it names must be there), else from the headers of the directory's files.
    A one-line UserError names a missing or unreadable shard."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError("unreadable shard index: no JSON object with a weight_map", str(index)) from None
        located = {key: directory / str(shard) for key, shard in weight_map.items()}
        for shard in sorted(set(located.values())):
            check_shard(shard)
        return located
    located = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with _opened(shard) as handle:
            located.update(dict.fromkeys(handle.keys(), shard))
    if not located:
        raise UserError("no .safetensors weights in the checkpoint directory", str(directory))
    return located


def check_shard(shard: Path) -> None:
    """Refuse a shard that is missing, or whose header does not cover the file (truncated)."""
    with _opened(shard):
        pass


@contextmanager
def _opened(shard: Path) -> Iterator[object]:
    if not shard.is_file():
        raise UserError("shard missing: the checkpoint's index names it, but it is not there", str(shard))
    try:
        with safe_open(shard, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise UserError(f"corrupt or truncated safetensors shard: {one_line(str(error))}", str(shard)) from None


@dataclass
class LazyWeights:
    """The tensors of a checkpoint directory, read into a weightless model's modules on demand.

    ``live_bytes``/``live_tensors`` count what is materialized now, ``peak_bytes``/
    ``peak_tensors`` the most at once: deterministic measures of the engine's host and
    device footprint, independent of the allocator.
    """

    directory: Path
    model: nn.Module
    dtype: torch.dtype
    shards: dict[str, Path] = field(init=False)
    live_bytes: int = 0
    live_tensors: int = 0
    peak_bytes: int = 0
    peak_tensors: int = 0

    def __post_init__(self) -> None:
        self.shards = shard_map(self.directory)
        self._tied = {
            target: source
            for target, source in (getattr(self.model, "all_tied_weights_keys", None) or {}).items()
            if target not in self.shards
        }

    def _parameters(self, module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
        """Each distinct parameter under ``module``: full name, owner, local name, parameter."""
        found, seen = [], set()
        for owner_name, owner in module.named_modules(prefix=prefix):
            for local, parameter in owner._parameters.items():
                if parameter is None or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                found.append((f"{owner_name}.{local}" if owner_name else local, owner, local, parameter))
        return found

    def _owners(self, parameter: nn.Parameter) -> list[tuple[nn.Module, str]]:
        """Every place in the model holding ``parameter`` (two for tied weights)."""
        return [
            (owner, local)
            for owner in self.model.modules()
            for local, held in owner._parameters.items()
            if held is parameter
        ]

    def load(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """Fill ``module`` (the model's submodule named ``prefix``) with its stored tensors on
        ``device``, in the model's dtype (floating-point tensors; others as stored)."""
        wanted = [entry for entry in self._parameters(module, prefix) if entry[3].is_meta]
        by_shard: dict[Path, list[tuple[str, str, nn.Parameter]]] = {}
        for name, _owner, _local, parameter in wanted:
            key = self._tied.get(name, name)
            if key not in self.shards:
                raise UserError(
                    f"the checkpoint lacks the weight {key}, which the architecture needs", str(self.directory)
                )
            by_shard.setdefault(self.shards[key], []).append((name, key, parameter))
        for shard, entries in by_shard.items():
            with _opened(shard) as handle:
                for _name, key, parameter in entries:
                    tensor = self._read(handle, key, shard)
                    if tuple(tensor.shape) != tuple(parameter.shape):
                        raise UserError(
                            f"weight {key} is stored as {list(tensor.shape)}, the architecture has "
                            f"{list(parameter.shape)}",
                            str(shard),
                        )
                    if tensor.is_floating_point():
                        tensor = tensor.to(self.dtype)
                    self._replace(parameter, nn.Parameter(tensor.to(device), requires_grad=parameter.requires_grad))
                    self._count(tensor, +1)

    def read_rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (of dim 0) of the stored tensor of parameter ``name`` (whole
        shape ``shape``), in the model's dtype if floating point: only those rows are read
        from the memory-mapped shard, which is closed again at once (FSDP's local shards)."""
        key = self._tied.get(name, name)
        if key not in self.shards:
            raise UserError(f"the checkpoint lacks the weight {key}, which the architecture needs", str(self.directory))
        shard = self.shards[key]
        with _opened(shard) as handle:
            try:
                stored = handle.get_slice(key)
                if tuple(stored.get_shape()) != shape:
                    raise UserError(
                        f"weight {key} is stored as {list(stored.get_shape())}, the architecture has {list(shape)}",
                        str(shard),
                    )
                rows = stored[start:stop]
            except (SafetensorError, OSError) as error:
                raise UserError(f"cannot read {key}: {one_line(str(error))}", str(shard)) from None
        return rows.to(self.dtype) if rows.is_floating_point() else rows

    def _read(self, handle: object, key: str, shard: Path) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {key}: {one_line(str(error))}", str(shard)) from None

    def release(self, module: nn.Module, prefix: str) -> None:
        """Empty ``module`` again: its parameters back on the meta device."""
        for _name, _owner, _local, parameter in self._parameters(module, prefix):
            if parameter.is_meta:
                continue
            self._count(parameter, -1)
            empty = torch.empty_like(parameter, device="meta")
            self._replace(parameter, nn.Parameter(empty, requires_grad=parameter.requires_grad))

    def _replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        for owner, local in self._owners(old):
            owner._parameters[local] = new

    def _count(self, tensor: torch.Tensor, sign: int) -> None:
        self.live_bytes += sign * tensor.numel() * tensor.element_size()
        self.live_tensors += sign
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.peak_tensors = max(self.peak_tensors, self.live_tensors)

    @contextmanager
    def materialized(self, module: nn.Module, prefix: str, device: torch.device) -> Iterator[nn.Module]:
        """``module`` filled on ``device`` inside the block, emptied after (also on error)."""
        try:
            self.load(module, prefix, device)
            yield module
        finally:
            self.release(module, prefix)


def model_dtype_of(spec_dtype: str, config: PretrainedConfig) -> torch.dtype:
    """The dtype a loader gives the model: the recipe's, or with ``auto`` config.json's (float32 if none)."""
    if spec_dtype != "auto":
        return getattr(torch, spec_dtype)
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def open_lazy(loader: Loader, spec: ModelSpec) -> tuple[LoadedModel, LazyWeights]:
    """The recipe's model as ``run: mode: lazy`` holds it: a weightless skeleton with its
    config and tokenizer, and the checkpoint's weights to fill it from (every shard checked)."""
    config, task = loader.load_config(spec)
    dtype = model_dtype_of(spec.dtype, config)
    model = empty_model(config, task, dtype, spec.trust_remote_code)
    load_tokenizer = getattr(loader, "load_tokenizer", None)
    tokenizer = load_tokenizer(spec, config, task) if load_tokenizer is not None else None
    directory = loader.weights_directory(spec)
    loaded = LoadedModel(model, tokenizer, model.config, task, base_model=Path(spec.name).name)
    return loaded, LazyWeights(directory, model, dtype)
