"""The ``compressed-tensors`` output format: integer weight grids, optionally with int8 activations.

Everything format-specific goes through the compressed-tensors library: the
``QuantizationScheme``/``QuantizationArgs``/``QuantizationConfig`` describing the grids,
the ``pack-quantized`` compressor that turns (weight, scale, zero point) into
``weight_packed``/``weight_scale``/``weight_zero_point``/``weight_shape``, and
``ModelCompressor.update_config`` for the ``quantization_config`` in config.json. The
result is what vLLM (4/8 bits, WNA16 kernels) and transformers (any of 2-8 bits,
decompressed on load) read.

The scales and zero points written are the ones the methods recorded in
``context.layers[name].quant``; the library only computes the integer codes from the
in-memory weights with them (``round(w / scale + zero_point)``, clamped), in float32 like
``QuantGrid.quantize``. Scales are stored in the layer's weight dtype, because that is
the dtype compressed-tensors gives ``weight_scale`` when it loads a checkpoint (its
``initialize_qparams`` uses the weight's dtype): exact for float32 models; for
bfloat16/float16 models each scale is rounded once to that dtype, so the reloaded
weights can differ from the in-memory ones by that rounding (≤ 2^-9 relative in bf16).

Layers whose inputs are quantized too (``LayerState.activations``, W8A8) are written in
the ``int-quantized`` format vLLM's W8A8 int kernels read: the weight codes as an int8
``weight`` tensor (not packed) with ``weight_scale``, and an ``input_activations`` entry
in their config group (``dynamic: true`` with ``token`` or ``tensor`` strategy, or
``dynamic: false``, ``tensor``, plus per-layer ``input_scale``/``input_zero_point``
tensors holding the calibrated scale in the weight dtype, as compressed-tensors loads it).
A checkpoint mixing both formats says ``mixed-precision``, each group naming its own.

The model is not modified: a state dict is built whose quantized entries are replaced by
the packed tensors (the others still alias the model's parameters), and saved with
``save_pretrained(state_dict=...)``.

Sparse layers (``LayerState.sparsity``) are stored with their zeros, packed like any other
weight when quantized (a zero is a grid point of every grid: code 0, or the zero point);
their pattern is recorded as the library's ``dense`` ``SparsityCompressionConfig`` under
``quantization_config.sparsity_config`` (see :mod:`compress.checkpoint.sparse`). vLLM
reads weight-only quantized layers with a 2:4 ``sparsity_config`` through its ordinary
WNA16 kernels (its 2:4 route needs 8-bit activations); transformers ignores the entry.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.checkpoint import WriterCapabilities
from compress.checkpoint.dtypes import StoredDtypeOptions, cast_floating, record_dtype, stored_dtype
from compress.errors import UserError

if TYPE_CHECKING:
    from compress.context import Context, LayerState
    from compress.quant import QuantGrid, QuantScheme
    from compress.quant.activations import ActivationScheme


WEIGHT_ONLY_FORMAT = "pack-quantized"
ACTIVATION_FORMAT = "int-quantized"
Schemes = tuple["QuantScheme", "ActivationScheme | None"]
"""A layer's weight grid scheme and input quantization scheme: one config group each."""


def ct_scheme(scheme: QuantScheme, activations: ActivationScheme | None, targets: list[str]):
    """The compressed-tensors scheme holding ``scheme``'s grids and ``activations``."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    strategy = {
        "tensor": QuantizationStrategy.TENSOR,
        "channel": QuantizationStrategy.CHANNEL,
        "group": QuantizationStrategy.GROUP,
    }[scheme.granularity]
    weights = QuantizationArgs(
        num_bits=scheme.bits,
        type=QuantizationType.INT,
        symmetric=scheme.symmetric,
        strategy=strategy,
        group_size=scheme.group_size,
        dynamic=False,
        observer="minmax",
    )
    input_activations = None
    if activations is not None:
        input_activations = QuantizationArgs(
            num_bits=activations.bits,
            type=QuantizationType.INT,
            symmetric=activations.symmetric,
            strategy=QuantizationStrategy.TOKEN if activations.strategy == "token" else QuantizationStrategy.TENSOR,
            dynamic=activations.dynamic,
        )
    return QuantizationScheme(
        targets=targets,
        weights=weights,
        input_activations=input_activations,
        output_activations=None,
        format=WEIGHT_ONLY_FORMAT if activations is None else ACTIVATION_FORMAT,
    )


def layer_schemes(layers: dict[str, LayerState]) -> dict[str, Schemes]:
    """The schemes of each quantized layer; a layer with quantized inputs needs a weight grid."""
    schemes = {}
    for name, state in layers.items():
        activations = state.activations.scheme if state.activations is not None else None
        if state.outliers is not None:
            # one grid per weight: writing only LayerState.quant would silently drop the outliers
            raise UserError("compressed-tensors cannot store outlier weights held apart from the grid", name)
        if state.quant is None:
            if activations is not None:
                raise UserError("compressed-tensors stores activation quantization with int weights only", name)
            continue
        schemes[name] = (state.quant.scheme, activations)
    return schemes


def quantization_config(model: nn.Module, schemes: dict[str, Schemes]):
    """The ``QuantizationConfig``: one config group per distinct scheme, other Linears ignored."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    ignore = [name for name in linears if name not in schemes]
    by_scheme: dict[Schemes, list[str]] = defaultdict(list)
    for name in linears:
        if name in schemes:
            by_scheme[schemes[name]].append(name)
    groups = {}
    for index, ((weights, activations), names) in enumerate(by_scheme.items()):
        # One scheme for every quantized Linear: target the class, the rest is in ignore.
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{index}"] = ct_scheme(weights, activations, targets)
    formats = {group.format for group in groups.values()}
    return QuantizationConfig(
        config_groups=groups,
        ignore=ignore,
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status=QuantizationStatus.COMPRESSED,
    )


def compress_layer(weight: torch.Tensor, grid: QuantGrid, scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one Linear weight on ``grid`` (local names, no prefix), scales in ``dtype``."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    # compressed-tensors picks its Triton kernel from the weight's device, so the grid must be there too;
    # in lazy mode the weight is still on the GPU while the grid was recorded on the host.
    device = weight.device
    local = {"weight": weight.detach().float(), "weight_scale": grid.scale.to(device, torch.float32)}
    if grid.zero_point is not None:
        local["weight_zero_point"] = grid.zero_point.to(device, torch.int8)
    packed = compressor.compress(local, scheme)
    packed["weight_scale"] = packed["weight_scale"].to(dtype)
    return {key: value.contiguous().cpu() for key, value in packed.items()}


def input_qparams(state: LayerState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A static layer's ``input_scale`` (in the weight dtype) and ``input_zero_point`` (int8)."""
    activations = state.activations
    if activations is None or activations.scheme.dynamic:
        return {}
    stored = {"input_scale": activations.scale.to(dtype)}
    if activations.zero_point is not None:
        stored["input_zero_point"] = activations.zero_point.to(torch.int8)
    return stored


class CompressedTensorsWriter:
    """compressed-tensors ``pack-quantized`` (W2-W8 A16; vLLM serves 4 and 8 bits) and
    ``int-quantized`` (W8A8 int, static or dynamic activation scales) checkpoints.

    Integer codes are packed into int32 by the compressed-tensors library; layers with
    different grids become separate config_groups; Linears left uncompressed (such as
    lm_head) are listed in ``ignore``. Sparse layers keep their zeros and are listed in
    ``sparsity_config`` (one structure per checkpoint). Loads with transformers'
    compressed-tensors integration and with vLLM.
    """

    name = "compressed-tensors"
    Options = StoredDtypeOptions
    capabilities = WriterCapabilities(
        weight_bits=frozenset(range(2, 9)),
        granularities=frozenset({"tensor", "channel", "group"}),
        activation_quantization=True,
        sparsity=True,
        packed_weights=True,
        layer_types=frozenset({"Linear"}),
    )
    # The method's own grids are written: the checkpoint is the in-memory model (exactly for
    # float32 models; up to the bf16/fp16 rounding of the scales otherwise).
    requantizes = False

    def write(self, context: Context, directory: Path, options: StoredDtypeOptions) -> None:
        from compress.checkpoint.sparse import sparsity_config, write_sparsity_config

        model = context.model
        sparsity = sparsity_config(model, context.layers)
        state_dict = self.stored_tensors(context, "", model, options)
        model.save_pretrained(directory, state_dict=state_dict, max_shard_size=context.recipe.output.max_shard_size)
        self._write_config(context, directory, options)
        if sparsity is not None:
            write_sparsity_config(directory, sparsity)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)

    def stored_tensors(
        self, context: Context, prefix: str, module: nn.Module, options: StoredDtypeOptions
    ) -> dict[str, torch.Tensor]:
        """The tensors stored for ``module`` (the model's submodule named ``prefix``), by full
        name: each quantized Linear's weight replaced by its packed codes, scales (and zero
        points, input scales); the model is not modified (the others alias its parameters)."""
        from compress.checkpoint.output import prefixed

        dtype = stored_dtype(options, context.model)
        schemes = layer_schemes(context.layers)
        state_dict = prefixed(module.state_dict(), prefix)
        for local, layer in module.named_modules(prefix=prefix):
            if local not in schemes:
                continue
            if not isinstance(layer, nn.Linear):
                raise UserError("compressed-tensors output holds quantized Linear layers only", local)
            del state_dict[f"{local}.weight"]
            state = context.layers[local]
            scheme = ct_scheme(*schemes[local], [local])
            stored = compress_layer(layer.weight, state.quant, scheme, dtype) | input_qparams(state, dtype)
            for key, value in stored.items():
                state_dict[f"{local}.{key}"] = value
        return cast_floating(state_dict, dtype)

    def _write_config(self, context: Context, directory: Path, options: StoredDtypeOptions) -> None:
        """config.json's dtype and ``quantization_config`` (all the layers' schemes, grouped)."""
        from compressed_tensors.compressors import ModelCompressor

        record_dtype(directory, stored_dtype(options, context.model))
        config = quantization_config(context.model, layer_schemes(context.layers))
        ModelCompressor(quantization_config=config).update_config(str(directory))

    def write_metadata(self, context: Context, directory: Path, options: StoredDtypeOptions) -> None:
        """What goes beside streamed shards (``run: mode: lazy``, :mod:`compress.checkpoint.stream`)."""
        from compress.checkpoint.output import save_metadata

        save_metadata(context, directory, stored_dtype(options, context.model))
        self._write_config(context, directory, options)
