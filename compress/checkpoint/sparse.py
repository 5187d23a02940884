"""Sparsity metadata: recording N:M patterns in checkpoints and loading 2:4 layers as sparse kernels.

Sparse weights are stored dense, with their zeros (vLLM no longer serves 2:4 kernels, so
a compressed sparse layout would only cost a decompression). What makes a checkpoint
"sparse" is its metadata: compressed-tensors' ``SparsityCompressionConfig`` in its
``dense`` format (``DenseSparsityConfig``), under ``quantization_config.sparsity_config``
of config.json, with ``sparsity_structure`` (``"2:4"``, ``"unstructured"``, ...),
``targets`` (the sparse layers, by name) and ``global_sparsity``. Writers build it with
:func:`sparsity_config`; :func:`semi_structured_layers` reads it back, and
:func:`to_semi_structured` turns the 2:4 layers of a loaded model into
``torch.sparse`` semi-structured weights (CUDA, compute capability 8.0+).

``torch.sparse.to_sparse_semi_structured`` does not check the pattern: it keeps two
values of every group of four whatever the other two are, so a weight that is not
really 2:4 would silently compute something else. :func:`verify_n_m` checks first.

This module needs only torch (and the compressed-tensors library when writing), so the
loader half runs on machines without the rest of the toolkit's dependencies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compress.errors import UserError

if TYPE_CHECKING:
    from compress.context import LayerState

SPARSITY_CONFIG = "sparsity_config"
"""The key under config.json's ``quantization_config`` (compressed-tensors' ``SPARSITY_CONFIG_NAME``)."""
MIN_CAPABILITY = (8, 0)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def parse_n_m(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; raise UserError for anything that is not ``N:M`` with 0 < N < M."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise UserError(f"not an N:M sparsity pattern (N nonzeros of every M, 0 < N < M): {pattern!r}")
    return int(match[1]), int(match[2])


def verify_n_m(weight: torch.Tensor, n: int, m: int, name: str | None = None) -> None:
    """Raise UserError unless every M consecutive weights of each row hold at most N nonzeros.

    ``weight`` is a Linear weight, ``(out_features, in_features)``; groups run along the
    input dimension (columns ``m*g .. m*g + m-1`` of a row), which is the layout
    semi-structured kernels use. The error names the first offending row and group
    (row-major order) and how many groups break the pattern. ``-0.0`` counts as zero,
    NaN as nonzero.
    """
    where = name or "weight"
    if weight.dim() != 2:
        raise UserError(f"N:M sparsity needs a 2-D weight, got shape {tuple(weight.shape)}", where)
    rows, columns = weight.shape
    if columns % m:
        raise UserError(f"input width {columns} is not a multiple of M={m}, so it cannot be {n}:{m} sparse", where)
    nonzeros = (weight.detach() != 0).view(rows, columns // m, m).sum(-1)
    bad = nonzeros > n
    if bad.any():
        first = int(bad.flatten().nonzero()[0])
        row, group = divmod(first, columns // m)
        raise UserError(
            f"not {n}:{m} sparse: row {row}, group {group} (input columns {group * m}-{group * m + m - 1}) "
            f"has {int(nonzeros[row, group])} nonzeros, at most {n} allowed "
            f"({int(bad.sum())} of {bad.numel()} groups break the pattern)",
            where,
        )


# --- writing -----------------------------------------------------------------------------


def sparse_layers(layers: Mapping[str, LayerState]) -> dict[str, str]:
    """``layer name -> pattern`` for the layers whose state records a sparsity pattern."""
    return {name: state.sparsity for name, state in layers.items() if getattr(state, "sparsity", None)}


def global_sparsity(model: nn.Module) -> float:
    """Fraction of zero entries over all the model's parameters (each shared one counted once),
    as llm-compressor reports ``global_sparsity``."""
    total = zeros = 0
    for parameter in model.parameters():  # parameters() already skips tied duplicates
        total += parameter.numel()
        zeros += int((parameter.detach() == 0).sum())
    return zeros / total if total else 0.0


def sparsity_config(model: nn.Module, layers: Mapping[str, LayerState]):
    """The compressed-tensors ``DenseSparsityConfig`` for the sparse layers, or None if there are none.

    Checks first that the weights still hold the recorded pattern (a later stage may have
    filled the zeros) and that one structure covers every sparse layer: the format holds
    a single ``sparsity_structure`` per checkpoint.
    """
    patterns = sparse_layers(layers)
    if not patterns:
        return None
    try:
        from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    except ImportError:
        raise UserError(
            "recording sparsity needs the compressed-tensors library (pip install compressed-tensors)"
        ) from None

    structures = sorted(set(patterns.values()))
    if len(structures) > 1:
        raise UserError(
            "compressed-tensors records one sparsity structure per checkpoint, but the layers hold "
            + ", ".join(f"{s} ({sum(p == s for p in patterns.values())} layers)" for s in structures)
        )
    structure = structures[0]
    modules = dict(model.named_modules())
    for name in patterns:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise UserError("sparsity is recorded for Linear layers only", name)
        if structure != "unstructured":
            verify_n_m(module.weight, *parse_n_m(structure), name=name)
    return SparsityCompressionConfig.load_from_registry(
        CompressionFormat.dense.value,
        targets=sorted(patterns),
        ignore=None,
        global_sparsity=global_sparsity(model),
        sparsity_structure=structure,
    )


def write_sparsity_config(directory: Path, config: Any) -> None:
    """Put ``config`` (a ``SparsityCompressionConfig``) under ``quantization_config.sparsity_config``
    of ``directory/config.json``.

    compressed-tensors' ``ModelCompressor.update_config`` (0.20) always writes an empty
    ``sparsity_config``; this fills it in the same layout. Without a quantization config
    (a dense checkpoint), the ``quantization_config`` is the one ``update_config`` would
    write, with no ``config_groups``: transformers loads it as a plain model.
    """
    import compressed_tensors
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
    )

    path = Path(directory) / "config.json"
    data = json.loads(path.read_text())
    quantization = data.get(QUANTIZATION_CONFIG_NAME) or {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
    }
    if quantization.get(QUANTIZATION_METHOD_NAME) != QUANTIZATION_METHOD:
        raise UserError(
            f"cannot add a compressed-tensors sparsity_config to a {quantization.get(QUANTIZATION_METHOD_NAME)!r} "
            "quantization_config",
            str(path),
        )
    quantization[SPARSITY_CONFIG_NAME] = config.model_dump()
    data[QUANTIZATION_CONFIG_NAME] = quantization
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- reading -----------------------------------------------------------------------------


def read_sparsity_config(directory: Path) -> dict[str, Any] | None:
    """The raw ``sparsity_config`` of a checkpoint directory, or None when it has none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError("not a checkpoint directory: no config.json", str(directory))
    quantization = json.loads(path.read_text()).get("quantization_config") or {}
    return quantization.get(SPARSITY_CONFIG) or None


def _stored_modules(directory: Path) -> list[str]:
    """Names of the modules whose weights the checkpoint stores (dense or packed)."""
    directory = Path(directory)
    keys: Iterable[str]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        keys = []
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                keys = [*keys, *f.keys()]
    suffixes = (".weight", ".weight_packed")
    return sorted({key.rsplit(".", 1)[0] for key in keys if key.endswith(suffixes)})


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def semi_structured_layers(directory: Path) -> list[str]:
    """The layers a checkpoint marks as 2:4 sparse, sorted (empty when it marks none).

    Reads config.json's ``quantization_config.sparsity_config``. Targets and ``ignore``
    entries may be layer names (what ``compress`` writes) or ``re:`` patterns, matched
    against the modules the checkpoint stores weights for. A class-name target
    (``Linear``, as llm-compressor writes) cannot be resolved without the model, and a
    name the checkpoint does not store is an error too: both raise UserError.
    """
    config = read_sparsity_config(directory)
    if not config or str(config.get("sparsity_structure") or "").strip().lower() != "2:4":
        return []
    targets = list(config.get("targets") or [])
    ignore = list(config.get("ignore") or [])
    stored = _stored_modules(directory)
    for target in targets:
        if target.startswith("re:") or target in stored:
            continue
        if target[:1].isupper():
            raise UserError(
                f"sparsity_config target {target!r} is a class name; resolve it against the model "
                "(compress writes layer names)",
                str(directory),
            )
        raise UserError(f"sparsity_config target {target!r} is not a layer the checkpoint stores", str(directory))
    selected = [name for name in stored if any(_matches(name, t) for t in targets)]
    return [name for name in selected if not any(_matches(name, t) for t in ignore)]


# --- loading as semi-structured sparse kernels --------------------------------------------


def _semi_structured_class():
    """The SparseSemiStructuredTensor subclass ``to_sparse_semi_structured`` will use."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def to_semi_structured(model: nn.Module, layer_names: Iterable[str]) -> None:
    """Replace each named Linear's weight by a ``torch.sparse`` semi-structured (2:4) tensor, in place.

    Every weight is verified to be 2:4 first (:func:`verify_n_m`), on whatever device it
    is. Then the weights must be float16/bfloat16, on a CUDA GPU of compute capability
    8.0 or more, with shapes the semi-structured backend accepts (both dimensions
    multiples of its minimum tile); every such problem raises UserError before any layer
    is converted, so the model is left as it was.
    """
    names = list(layer_names)
    modules = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            raise UserError("no such layer in the model", name)
        if not isinstance(module, nn.Linear):
            raise UserError(f"semi-structured sparsity applies to Linear layers, not {type(module).__name__}", name)
        linears[name] = module
    for name, module in linears.items():
        verify_n_m(module.weight, 2, 4, name=name)
    if not linears:
        return

    devices = {module.weight.device for module in linears.values()}
    off_gpu = sorted(n for n, m in linears.items() if m.weight.device.type != "cuda")
    if off_gpu:
        available = ""
        if torch.cuda.is_available():
            available = " (a CUDA GPU is available: move the model to it first)"
        raise UserError(
            "semi-structured sparse kernels need a CUDA GPU of compute capability 8.0+; "
            f"{len(off_gpu)} layers are on {', '.join(sorted({str(linears[n].weight.device) for n in off_gpu}))}"
            f", e.g. {off_gpu[0]}{available}"
        )
    for device in devices:
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise UserError(
                "semi-structured sparse kernels need a CUDA GPU of compute capability 8.0+; "
                f"{device} ({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}"
            )
    wrong_dtype = sorted(n for n, m in linears.items() if m.weight.dtype not in SEMI_STRUCTURED_DTYPES)
    if wrong_dtype:
        dtype = linears[wrong_dtype[0]].weight.dtype
        raise UserError(
            f"semi-structured sparse weights must be float16 or bfloat16; {len(wrong_dtype)} layers are "
            f"{dtype}, e.g. {wrong_dtype[0]} (load the model with dtype=torch.bfloat16 or float16)"
        )
    subclass = _semi_structured_class()
    unsupported = []
    for name, module in linears.items():
        constraints = subclass._DTYPE_SHAPE_CONSTRAINTS[module.weight.dtype]
        rows, columns = module.weight.shape
        min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
        if rows < min_rows or rows % min_rows or columns < min_cols or columns % min_cols:
            unsupported.append(f"{name} {rows}x{columns} (needs multiples of {min_rows}x{min_cols})")
    if unsupported:
        raise UserError(
            f"weight shapes {subclass.__name__} does not support ({module.weight.dtype} rows and columns "
            f"must be multiples of its minimum tile): {'; '.join(unsupported)}"
        )
    from torch.sparse import to_sparse_semi_structured

    for module in linears.values():
        weight = module.weight
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach().contiguous()), requires_grad=False)
