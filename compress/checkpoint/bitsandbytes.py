"""The ``bitsandbytes`` output format: nf4 / fp4 (4-bit, blockwise absmax) and LLM.int8.

Every ``nn.Linear`` of the model except those ``ignore`` names (``lm_head`` by default)
is quantized by bitsandbytes' own modules (``Linear4bit`` with ``Params4bit``,
``Linear8bitLt`` with ``Int8Params``) and serialized with their own ``state_dict``,
exactly as transformers does when it quantizes a model on load; ``config.json`` gets
the ``quantization_config`` (``quant_method: bitsandbytes``) that
``AutoModelForCausalLM.from_pretrained`` reads back. Everything else is written as the
dense writer writes it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.checkpoint import WriterCapabilities, WriterOptions
from compress.checkpoint.dtypes import DTYPES
from compress.errors import UserError
from compress.targets import entry_matches, invalid_patterns

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from compress.context import Context


class BitsAndBytesOptions(WriterOptions):
    quant_type: Literal["nf4", "fp4", "int8"] = Field(
        "nf4",
        description="nf4 or fp4: 4-bit codes with one absmax scale per block; "
        "int8: LLM.int8, 8-bit codes with one absmax scale per output row",
    )
    double_quant: bool = Field(
        True, description="4-bit only: quantize the per-block absmax scales again to 8 bits (saves ~0.4 bit/weight)"
    )
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="4-bit only: weights per absmax scale"
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit only: dtype the layers compute in when loaded; auto: the model's dtype"
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Linear modules kept dense: qualified names, class names or re:<pattern> (as stage targets)",
    )

    @field_validator("ignore")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        problems = invalid_patterns(value)
        if problems:
            raise ValueError(problems[0][1])
        return value


def bnb_config(options: BitsAndBytesOptions, model_dtype: torch.dtype, skip: list[str] | None) -> BitsAndBytesConfig:
    """The ``quantization_config`` transformers expects for a checkpoint written with ``options``.

    ``skip``: the Linear modules left dense, by name (transformers does not read patterns).
    """
    from transformers import BitsAndBytesConfig

    if options.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = model_dtype if options.compute_dtype == "auto" else DTYPES[options.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip,
    )


def quantize_linear(module: nn.Linear, options: BitsAndBytesOptions, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer (on the host) holding ``module``'s weight quantized by bitsandbytes."""
    import bitsandbytes as bnb

    weight = module.weight.detach().to("cpu").clone()
    bias = module.bias is not None
    if options.quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(
            module.in_features, module.out_features, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=options.double_quant,
            quant_type=options.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=options.blocksize,
            compress_statistics=options.double_quant,
            quant_type=options.quant_type,
            quant_storage=torch.uint8,
            module=layer,
        )
    if bias:
        layer.bias = nn.Parameter(module.bias.detach().to("cpu").clone(), requires_grad=False)
    return layer.to("cpu")  # moving the parameters to a device is what quantizes them


def quantized_modules(model: nn.Module, options: BitsAndBytesOptions) -> dict[str, nn.Linear]:
    """The Linear modules the writer quantizes: all of them but those ``ignore`` names."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(entry_matches(e, name, module) for e in options.ignore)
    }


class BitsAndBytesWriter:
    """bitsandbytes nf4 / fp4 / int8 checkpoints, loadable with ``from_pretrained``.

    What it can hold: unquantized weights, dense or pruned (zero is exactly representable
    in nf4, fp4 and int8, so pruned weights stay zero; they are not stored compactly, and no
    N:M pattern is recorded: a recipe with a 2:4 stage is refused).
    bitsandbytes quantizes the weights itself with its own codebook and absmax scales,
    so it cannot store the integer grid a quantization method chose: ``weight_bits`` is
    empty and a recipe with such a stage (e.g. rtn) is refused at ``recipe check``.
    """

    name = "bitsandbytes"
    Options = BitsAndBytesOptions
    capabilities = WriterCapabilities(
        weight_bits=frozenset(), granularities=frozenset(), sparsity=True, sparsity_patterns=False
    )
    requantizes = True

    def write(self, context: Context, directory: Path, options: BitsAndBytesOptions) -> None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise UserError(f"output format bitsandbytes needs the bitsandbytes package ({error})") from None
        model = context.model
        dtype = next(model.parameters()).dtype
        targets = quantized_modules(model, options)
        dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
        config = bnb_config(options, dtype, dense or None)
        if not targets:
            raise UserError("output format bitsandbytes: no Linear module left to quantize (check ignore)")
        state = model.state_dict()
        for name, module in targets.items():
            shared = [
                k for k, v in state.items() if v.data_ptr() == module.weight.data_ptr() and not k.startswith(name + ".")
            ]
            if shared:
                raise UserError(f"{name}.weight is tied to {shared[0]}; add {name} to the output's ignore", name)
            if options.quant_type != "int8" and module.in_features % options.blocksize:
                raise UserError(
                    f"blocksize {options.blocksize} does not divide the input width {module.in_features} "
                    "(bitsandbytes' CPU kernels cannot load blocks that straddle rows)",
                    name,
                )
            for key in [k for k in state if k.startswith(name + ".")]:
                del state[key]
            layer = quantize_linear(module, options, config.bnb_4bit_compute_dtype)
            state.update(layer.state_dict(prefix=name + "."))
        model.save_pretrained(directory, state_dict=state, max_shard_size=context.recipe.output.max_shard_size)
        quantized_config = copy.deepcopy(model.config)
        quantized_config.quantization_config = config.to_dict()
        quantized_config.save_pretrained(directory)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(directory)
