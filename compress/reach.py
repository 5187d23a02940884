"""Which modules outside a model's repeated blocks its forward pass reaches, found without weights.

A calibration stage feeds a target outside the blocks (``lm_head``, a classifier) what the
model's forward pass gives it once the blocks are compressed; a module the forward pass never
calls (a head the architecture builds but does not use) cannot be calibrated. The run finds
that only after every block; :func:`unreached` finds it at ``compress recipe check`` by running
the weightless model (on the meta device: shapes only, no arithmetic) on a two-token input, or
one image for an image classifier, with a hook on each module in question.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def meta_inputs(task: str, config: Any) -> dict[str, torch.Tensor]:
    """A minimal input of a ``task`` model with this config, on the meta device."""
    if task == "image-classification":
        size = config.image_size
        return {"pixel_values": torch.empty(1, config.num_channels, size, size, device="meta")}
    # no attention mask: a mask is read for its values (whether any position is padding), which meta tensors lack
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device="meta")}


PROBE_SIZES = ((48, 48), (64, 40))
"""Blank images of two sizes and shapes: an image processor that makes the same pixels of both fixes its output size."""


def forward_inputs(model: nn.Module, task: str, config: Any, processor: Any) -> dict[str, torch.Tensor] | None:
    """One input of the meta ``model`` shaped as its data will be: for an image classifier, one
    image as ``processor`` (the model's image processor) makes it, None when its output size
    follows the image's (then only the data tells); two tokens for a language model. None too when
    the model's forward pass cannot run on the meta device."""
    if task == "image-classification":
        if processor is None:
            return None
        from PIL import Image

        shapes = {
            tuple(processor(images=Image.new("RGB", size), return_tensors="pt")["pixel_values"].shape[1:])
            for size in PROBE_SIZES
        }
        if len(shapes) != 1:
            return None
        inputs = {"pixel_values": torch.empty(1, *shapes.pop(), device="meta")}
    else:
        inputs = meta_inputs(task, config)
    try:
        with torch.no_grad():
            model(**inputs)
    # any failure of the model's own code on meta tensors, as in unreached
    except Exception:
        return None
    return inputs


def unreached(model: nn.Module, names: list[str], task: str, config: Any) -> list[str] | None:
    """The modules of ``names`` (of the meta ``model``) that its forward pass does not call, in
    the order given; None when the architecture's forward cannot run on the meta device (its own
    code needs real values), and the run is left to find them."""
    called: set[str] = set()
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda _module, _args, name=name: called.add(name))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(**meta_inputs(task, config))
    # any failure of the model's own code on meta tensors (NotImplementedError, RuntimeError, ...)
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name in names if name not in called]
