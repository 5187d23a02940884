"""Loaders for Hugging Face directories, .gguf files and cached hub ids. No pickle, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)

from compress.checkpoint import LoadedModel
from compress.errors import UserError
from compress.recipe import ModelSpec

AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "encoder": AutoModel,
    "image-classification": AutoModelForImageClassification,
}


def infer_task(config: PretrainedConfig) -> str:
    """The task of the checkpoint's head, from transformers' own auto-class mappings."""
    architectures = set(config.architectures or [])
    if architectures & class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal-lm"
    if architectures & class_names(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
        return "image-classification"
    return "encoder"


def class_names(mapping: dict[str, str | tuple[str, ...]]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def torch_dtype(spec: ModelSpec) -> torch.dtype | str:
    return "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)


def meta_model(config: PretrainedConfig, task: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A weightless copy of the architecture: module names, classes and shapes only."""
    with torch.device("meta"):
        return AUTO_CLASSES[task].from_config(config, trust_remote_code=trust_remote_code)


def check_safetensors(directory: Path) -> list[Path]:
    """The directory's safetensors files; the library checks each header covers the whole file."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise UserError(f"no .safetensors weights in the checkpoint directory{hint}", str(directory))
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise UserError(f"corrupt safetensors file: {error}", str(file)) from None
    return files


def load_tokenizer(directory: Path, task: str, **kwargs: Any) -> Any:
    try:
        if task == "image-classification":
            return AutoImageProcessor.from_pretrained(directory, **kwargs)
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, ImportError):  # none saved, or its library is not installed
        return None


class DirectoryLoader:
    """A Hugging Face checkpoint directory with config.json and safetensors weights."""

    name = "directory"

    def claims(self, spec: ModelSpec) -> bool:
        return Path(spec.name).is_dir()

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        directory = Path(spec.name)
        if not (directory / "config.json").is_file():
            raise UserError("not a Hugging Face checkpoint: no config.json", str(directory))
        try:
            config = AutoConfig.from_pretrained(directory, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as error:
            raise UserError(f"unreadable config.json: {error}", str(directory)) from None
        check_safetensors(directory)
        return config, spec.task or infer_task(config)

    def load(self, spec: ModelSpec) -> LoadedModel:
        directory = Path(spec.name)
        config, task = self.load_config(spec)
        try:
            model, info = AUTO_CLASSES[task].from_pretrained(
                directory,
                dtype=torch_dtype(spec),
                use_safetensors=True,
                trust_remote_code=spec.trust_remote_code,
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise UserError(f"cannot load the checkpoint: {error}", str(directory)) from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise UserError(
                f"the checkpoint lacks {len(missing)} weight(s) the architecture needs, e.g. {missing[0]}",
                str(directory),
            )
        tokenizer = load_tokenizer(directory, task, trust_remote_code=spec.trust_remote_code)
        if tokenizer is None and task == "image-classification":
            from compress.images import default_image_processor

            tokenizer = default_image_processor(config)
        return LoadedModel(model.eval(), tokenizer, config, task, base_model=directory.name)


class GGUFLoader:
    """A .gguf file, dequantized by transformers through the gguf package (causal LMs)."""

    name = "gguf"

    def claims(self, spec: ModelSpec) -> bool:
        return spec.name.endswith(".gguf")

    def _path(self, spec: ModelSpec) -> Path:
        path = Path(spec.name)
        if not path.is_file():
            raise UserError("GGUF file not found", str(path))
        return path

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        path = self._path(spec)
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"unreadable GGUF file: {error}", str(path)) from None
        return config, "causal-lm"

    def load(self, spec: ModelSpec) -> LoadedModel:
        path = self._path(spec)
        dtype = torch.float32 if spec.dtype == "auto" else getattr(torch, spec.dtype)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load GGUF file: {error}", str(path)) from None
        model = dequantized_copy(loaded)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return LoadedModel(model, tokenizer, model.config, "causal-lm", base_model=path.stem)


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The GGUF-loaded model's weights in a plain model built from its config.

    transformers flags a GGUF-loaded model as quantized and refuses to save it; a model
    built ``from_config`` without ``quantization_config`` holds the same tensors and saves.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    # state_dict() leaves out non-persistent buffers (rotary inv_freq): carry them over too
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer
    plain.tie_weights()
    return plain.eval()


class HubCacheLoader:
    """A hub id (``org/name``) already in the local Hugging Face cache. Never downloads."""

    name = "hub-cache"
    directory_loader = DirectoryLoader()

    def claims(self, spec: ModelSpec) -> bool:
        parts = spec.name.split("/")
        return len(parts) == 2 and all(parts) and not Path(spec.name).exists()

    def _local(self, spec: ModelSpec) -> ModelSpec:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            directory = snapshot_download(spec.name, revision=spec.revision, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError):
            raise UserError(
                "not a local path and not in the local Hugging Face cache "
                "(compress never downloads; fetch it first with `hf download`)",
                spec.name,
            ) from None
        return spec.model_copy(update={"name": directory})

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        return self.directory_loader.load_config(self._local(spec))

    def load(self, spec: ModelSpec) -> LoadedModel:
        loaded = self.directory_loader.load(self._local(spec))
        loaded.base_model = spec.name
        return loaded
