"""The dtype a writer stores a checkpoint's floating-point tensors in (``output: dtype``).

A model can be compressed in one dtype and stored in another: the built-in SmolLM2 loads
in float32 (dequantized from its GGUF file), and its compressed checkpoint is stored in
bfloat16 like the original Hugging Face one. The writers cast the tensors they store
(the in-memory model is not changed), and config.json's ``dtype`` names the stored one,
which ``from_pretrained(..., dtype="auto")`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.checkpoint import WriterOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoredDtypeOptions(WriterOptions):
    """Writer options of the formats that store a model's dense tensors as they are."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the stored floating-point tensors (weights that are not quantized, scales); "
        "auto: the model's",
    )


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def stored_dtype(options: WriterOptions, model: nn.Module) -> torch.dtype:
    """The dtype ``options`` store ``model``'s floating-point tensors in."""
    name = getattr(options, "dtype", "auto")
    return model_dtype(model) if name == "auto" else DTYPES[name]


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state_dict`` with its floating-point tensors in ``dtype``; tensors that shared memory
    (tied embeddings and LM head) still share it, so the writer stores them once."""
    cast: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    result = {}
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            result[key] = tensor
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in cast:
            cast[identity] = tensor.to(dtype)
        result[key] = cast[identity]
    return result


def record_dtype(directory: Path, dtype: torch.dtype) -> None:
    """Set config.json's ``dtype`` (which transformers writes from the in-memory model) to ``dtype``."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
