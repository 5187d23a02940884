"""Preset quantization schemes: ``scheme: W4A16`` on a stage, named and defined as in compressed-tensors.

LLM Compressor writes ``QuantizationModifier(scheme="W4A16")`` or ``GPTQModifier(scheme="W8A8")``;
the names and what they mean are compressed-tensors' ``PRESET_SCHEMES`` (looked up, like its
``preset_name_to_scheme``, case-insensitively). Here a preset sets the parameters of the stage's
method that describe the same grid, read from that table (so the two cannot drift apart):

- weights ``num_bits``, ``symmetric`` -> ``bits``, ``symmetric``; strategy ``group`` ->
  ``group_size``, ``channel`` -> ``group_size: null``, ``tensor`` -> ``granularity: tensor``;
- dynamic integer ``input_activations`` -> ``activations: {bits, symmetric, strategy, dynamic: true}``
  (methods with an ``activations`` parameter, e.g. ``rtn``).

Keys the stage gives itself take precedence; ``granularity`` and ``group_size`` go together (a
stage giving either replaces both). Presets this toolkit cannot produce are refused, naming why
and the presets the method takes: floating-point grids (FP8, NVFP4, MXFP4: our methods make
integer grids), static input scales (calibrated by an ``activation_scales`` stage instead) and
block-wise scales. The expansion table is in docs/plugins.md ("Preset schemes").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from compress.errors import UserError, did_you_mean

GRID_SHAPE = ("granularity", "group_size")
"""The keys that describe one thing, the shape of the grid's scale groups: set together."""


def preset_table() -> dict[str, dict[str, Any]]:
    """compressed-tensors' presets by name: ``{name: {"weights": QuantizationArgs, ...}}``."""
    try:
        from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    except ImportError:
        raise UserError("preset schemes need the compressed-tensors package: pip install compressed-tensors") from None
    return PRESET_SCHEMES


def grid_params(name: str) -> dict[str, Any]:
    """The stage parameters preset ``name`` (upper case, known) stands for; a UserError saying why
    when it is a grid no method here makes."""
    preset = preset_table()[name]
    weights, inputs = preset.get("weights"), preset.get("input_activations")
    if weights is None:
        raise UserError(f"scheme {name!r} quantizes no weights")
    if preset.get("output_activations") is not None:
        raise UserError(f"scheme {name!r} quantizes layer outputs, which no method here does")
    if weights.type != "int":
        raise UserError(
            f"scheme {name!r} has {weights.num_bits}-bit float weights; the methods here make integer grids"
        )
    if weights.strategy not in ("group", "channel", "tensor"):
        raise UserError(f"scheme {name!r} has per-{weights.strategy} weight scales, which no method here makes")
    params: dict[str, Any] = {"bits": weights.num_bits, "symmetric": weights.symmetric}
    if weights.strategy == "tensor":
        params["granularity"] = "tensor"
    else:
        params["group_size"] = weights.group_size if weights.strategy == "group" else None
    if inputs is not None:
        if inputs.type != "int":
            raise UserError(f"scheme {name!r} has {inputs.num_bits}-bit float activations; only integer ones are made")
        if inputs.dynamic is not True:
            raise UserError(
                f"scheme {name!r} has static input scales; calibrate them with an activation_scales stage instead"
            )
        if inputs.strategy not in ("token", "tensor"):
            raise UserError(f"scheme {name!r} has per-{inputs.strategy} input scales, which no method here makes")
        params["activations"] = {
            "bits": inputs.num_bits,
            "symmetric": inputs.symmetric,
            "strategy": inputs.strategy,
            "dynamic": True,
        }
    return params


def method_params(name: str, params_class: type[BaseModel], method: str) -> dict[str, Any]:
    """The parameters preset ``name`` sets for ``method`` (whose parameters are ``params_class``).

    A UserError for an unknown preset (with a did-you-mean), or one the method cannot take,
    naming why and the presets it takes.
    """
    table = preset_table()
    known = name.upper()
    if known not in table:
        raise UserError(f"unknown scheme {name!r}{did_you_mean(known, list(table))}")
    try:
        params = grid_params(known)
        missing = [key for key in params if key not in params_class.model_fields]
        if missing:
            raise UserError(f"{method} has no parameter {missing[0]!r}, which scheme {known!r} sets")
    except UserError as error:
        taken = supported(params_class)
        raise UserError(f"{error.message} (schemes {method} takes: {', '.join(taken) or 'none'})") from None
    return params


def supported(params_class: type[BaseModel]) -> list[str]:
    """The presets whose parameters ``params_class`` has, in compressed-tensors' order."""
    names = []
    for name in preset_table():
        try:
            params = grid_params(name)
        except UserError:
            continue
        if all(key in params_class.model_fields for key in params):
            names.append(name)
    return names


def expand_scheme(name: str, params_class: type[BaseModel], method: str, given: dict[str, Any]) -> dict[str, Any]:
    """A stage's parameters ``given`` with preset ``name`` filled in underneath them."""
    preset = method_params(name, params_class, method)
    if any(key in given for key in GRID_SHAPE):
        preset = {key: value for key, value in preset.items() if key not in GRID_SHAPE}
    return {**preset, **given}
