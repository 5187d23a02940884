"""What a written checkpoint holds: its format, each layer's bits, and bytes on disk vs bf16."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compress.checkpoint.loaders import infer_task, load_hf_config, meta_model, read_config_json, stored_tensors
from compress.errors import UserError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LayerSummary:
    name: str
    storage: str
    """How the weights are stored, e.g. ``int4 group 64 sym`` or ``nf4`` or ``bf16``."""
    disk_bytes: int
    bf16_bytes: int


@dataclass
class CheckpointSummary:
    format: str
    disk_bytes: int
    bf16_bytes: int
    layers: list[LayerSummary] = field(default_factory=list)
    sparsity: str | None = None

    def linear_ratio(self) -> float:
        """Bytes of the Linear layers on disk over the same layers in bf16."""
        return sum(layer.disk_bytes for layer in self.layers) / sum(layer.bf16_bytes for layer in self.layers)


def tensor_bytes(directory: Path) -> dict[str, int]:
    """Bytes of every stored tensor, read from the safetensors headers only."""
    return {
        key: math.prod(shape) * DTYPE_BYTES.get(dtype, 4) for key, (shape, dtype) in stored_tensors(directory).items()
    }


def compressed_tensors_storage(config: dict[str, Any]) -> dict[str, str]:
    """Layer name (or ``*`` for class targets) -> its grid, from compressed-tensors' config groups."""
    storage = {}
    for group in config.get("config_groups", {}).values():
        weights = group.get("weights") or {}
        grid = f"int{weights.get('num_bits')} {weights.get('strategy')}"
        if weights.get("strategy") == "group":
            grid += f" {weights.get('group_size')}"
        grid += " sym" if weights.get("symmetric", True) else " asym"
        inputs = group.get("input_activations")
        if inputs:
            grid += f", a{inputs.get('num_bits')} {'dynamic' if inputs.get('dynamic') else 'static'} {inputs.get('strategy')}"
        for target in group.get("targets", []):
            storage["*" if target == "Linear" else target] = grid
    return storage


def layer_storage(name: str, quantization: dict[str, Any], stored: set[str]) -> str:
    method = quantization.get("quant_method")
    if method == "compressed-tensors":
        grids = compressed_tensors_storage(quantization)
        if f"{name}.weight_packed" in stored or f"{name}.weight_scale" in stored:
            return grids.get(name) or grids.get("*", "quantized")
    if method == "bitsandbytes":
        if any(key.startswith(f"{name}.weight.quant_state.") for key in stored):
            return quantization.get("bnb_4bit_quant_type", "4bit")
        if f"{name}.SCB" in stored or f"{name}.weight.SCB" in stored:
            return "int8"
    return "dense"


def inspect_checkpoint(directory: Path) -> CheckpointSummary:
    """What ``directory`` holds, from config.json and the safetensors headers (no weights read).

    A one-line UserError naming the directory when it is not a checkpoint this can describe:
    no such directory, a file, a bad config.json, no safetensors, no Linear weights.
    """
    directory = Path(directory)
    quantization = read_config_json(directory).get("quantization_config") or {}
    if not isinstance(quantization, dict):
        raise UserError("config.json's quantization_config is not an object", str(directory / "config.json"))
    sizes = tensor_bytes(directory)
    config = load_hf_config(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    skeleton = meta_model(config, infer_task(config))
    stored = set(sizes)
    layers = []
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear):
            disk = sum(size for key, size in sizes.items() if key.startswith(name + "."))
            if disk:  # a tied lm_head stores nothing of its own
                layers.append(
                    LayerSummary(name, layer_storage(name, quantization, stored), disk, 2 * module.weight.numel())
                )
    if not layers:
        raise UserError("the safetensors files hold no weights of config.json's Linear layers", str(directory))
    unique = {id(p): p.numel() for p in skeleton.parameters()}
    fmt = quantization.get("quant_method", "dense")
    if fmt == "compressed-tensors":
        fmt += f" ({quantization.get('format')})"
    sparsity = (quantization.get("sparsity_config") or {}).get("sparsity_structure")
    return CheckpointSummary(fmt, sum(sizes.values()), 2 * sum(unique.values()), layers, sparsity)


def storage_groups(summary: CheckpointSummary) -> dict[str, list[LayerSummary]]:
    groups: dict[str, list[LayerSummary]] = defaultdict(list)
    for layer in summary.layers:
        groups[layer.storage].append(layer)
    return groups
