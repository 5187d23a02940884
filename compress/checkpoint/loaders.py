"""Loaders for Hugging Face directories, .gguf files and Hub ids. No pickle; the Hub only through huggingface_hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)

from compress.checkpoint import LoadedModel
from compress.errors import Location, UserError, one_line
from compress.recipe import ModelSpec

REMOTE_CODE = (
    "the architecture is Python code shipped with the checkpoint (auto_map in config.json); "
    "it runs only with `trust_remote_code: true` in the recipe's model section"
)


def transformers_error(error: BaseException) -> str:
    """transformers' (often multi-line) error as one line; its trust_remote_code refusal as ours."""
    text = str(error)
    return REMOTE_CODE if "trust_remote_code" in text else f"{type(error).__name__}: {one_line(text)}"


def read_config_json(directory: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict, refused in one line when it is not one
    transformers can build: missing, not JSON, not an object, no known ``model_type``, or custom
    code (``auto_map``) without ``trust_remote_code``."""
    path = directory / "config.json"
    if directory.is_file():
        raise UserError("a file, not a checkpoint directory", str(directory))
    if not directory.is_dir():
        raise UserError("no such checkpoint directory", str(directory))
    if not path.is_file():
        raise UserError("not a Hugging Face checkpoint: no config.json", str(directory))
    text = path.read_bytes()
    if not text.strip():
        raise UserError("config.json is empty", str(path))
    try:
        raw = json.loads(text)
    except UnicodeDecodeError:
        raise UserError("config.json is not UTF-8 text", str(path)) from None
    except json.JSONDecodeError as error:
        where = Location(str(path), error.lineno, error.colno)
        raise UserError(f"config.json is not valid JSON: {error.msg}", where) from None
    if not isinstance(raw, dict):
        raise UserError(f"config.json holds a JSON {type(raw).__name__}, not an object", str(path))
    custom = bool(raw.get("auto_map"))
    model_type = raw.get("model_type")
    if not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        if custom and not trust_remote_code:
            raise UserError(REMOTE_CODE, str(directory))
        if not custom:
            known = f"model_type {model_type!r} is" if model_type is not None else "no model_type"
            raise UserError(f"config.json names {known} not an architecture this transformers knows", str(path))
    return raw


def load_hf_config(directory: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config as transformers reads it, or a one-line UserError naming the directory."""
    read_config_json(directory, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    # transformers builds the config from arbitrary JSON values: any exception means a bad value
    except Exception as error:
        raise UserError(f"unreadable config.json: {transformers_error(error)}", str(directory)) from None


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
    """A weightless copy of the architecture: module names, classes and shapes only; a
    one-line UserError naming the checkpoint when config.json's values cannot build it."""
    try:
        with torch.device("meta"):
            return AUTO_CLASSES[task].from_config(config, trust_remote_code=trust_remote_code)
    # the model's constructor checks the config's values in its own way (ValueError, AttributeError, ...)
    except Exception as error:
        where = getattr(config, "name_or_path", "") or "config.json"
        raise UserError(f"config.json does not build a model: {transformers_error(error)}", where) from None


def stored_tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every tensor in the directory's safetensors files, read from their
    headers (the library checks each header covers its whole file). A one-line UserError when
    there are none, or a file is corrupt."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise UserError(f"no .safetensors weights in the checkpoint directory{hint}", str(directory))
    check_shard_index(directory)
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    piece = handle.get_slice(key)
                    tensors[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as error:
            raise UserError(f"corrupt safetensors file: {one_line(str(error))}", str(file)) from None
    return tensors


def check_shard_index(directory: Path) -> None:
    """Refuse a ``model.safetensors.index.json`` that is unreadable or names a shard that is not there."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        shards = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError("unreadable shard index: no JSON object with a weight_map", str(index)) from None
    missing = sorted(str(shard) for shard in shards if not (directory / str(shard)).is_file())
    if missing:
        raise UserError(
            f"model.safetensors.index.json names {missing[0]}, which is not in the directory", str(directory)
        )


def check_shapes(directory: Path, config: PretrainedConfig, task: str, trust_remote_code: bool) -> None:
    """Refuse a stored weight whose shape is not the architecture's, naming it, before
    transformers would log a table of mismatches and raise a message that names none."""
    stored = stored_tensors(directory)
    if getattr(config, "quantization_config", None) is not None:
        return  # quantized formats store packed tensors under the weights' own names
    for name, tensor in meta_model(config, task, trust_remote_code).state_dict().items():
        shape = stored.get(name, (None,))[0]
        if shape is not None and shape != tuple(tensor.shape):
            raise UserError(
                f"weight {name} is stored as {list(shape)}, but config.json's architecture has {list(tensor.shape)}",
                str(directory),
            )


def load_tokenizer(directory: Path, task: str, **kwargs: Any) -> Any:
    try:
        if task == "image-classification":
            # imported here: it imports transformers' modeling code, which commands without a model never need
            from transformers import AutoImageProcessor

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
        config = load_hf_config(directory, spec.trust_remote_code)
        task = spec.task or infer_task(config)
        check_shapes(directory, config, task, spec.trust_remote_code)
        return config, task

    def weights_directory(self, spec: ModelSpec) -> Path:
        """The directory holding the safetensors shards ``load`` reads (``run: mode: lazy`` reads them itself)."""
        return Path(spec.name)

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
            raise UserError(f"cannot load the checkpoint: {transformers_error(error)}", str(directory)) from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise UserError(
                f"the checkpoint lacks {len(missing)} weight(s) the architecture needs, e.g. {missing[0]}",
                str(directory),
            )
        tokenizer = self.load_tokenizer(spec, config, task)
        return LoadedModel(model.eval(), tokenizer, config, task, base_model=directory.name)

    def load_tokenizer(self, spec: ModelSpec, config: PretrainedConfig, task: str) -> Any:
        """The tokenizer (or image processor) :meth:`load` returns, without reading weights."""
        tokenizer = load_tokenizer(Path(spec.name), task, trust_remote_code=spec.trust_remote_code)
        if tokenizer is None and task == "image-classification":
            from compress.images import default_image_processor

            tokenizer = default_image_processor(config)
        return tokenizer


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
            raise UserError(f"unreadable GGUF file: {transformers_error(error)}", str(path)) from None
        return config, "causal-lm"

    def load(self, spec: ModelSpec) -> LoadedModel:
        path = self._path(spec)
        dtype = torch.float32 if spec.dtype == "auto" else getattr(torch, spec.dtype)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"cannot load GGUF file: {transformers_error(error)}", str(path)) from None
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


MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
"""What a model needs from its Hub repository: config, safetensors weights and their index,
tokenizer (or image processor) files and the chat template; never pickles, ONNX or GGUF copies,
nor anything in subfolders."""
CODE_FILES = ["*.py"]
"""The architecture's own code, fetched only with ``trust_remote_code: true``."""


class HubLoader:
    """A Hub model id (``org/name``), downloaded into the Hugging Face cache through huggingface_hub.

    ``load_config`` (``compress recipe check``) fetches config.json alone, and the tokenizer files
    when the data checks need them; ``load`` fetches :data:`MODEL_FILES`. ``HF_HUB_OFFLINE=1`` or
    ``COMPRESS_NO_DOWNLOAD=1`` restricts it to what the cache holds (:mod:`compress.hub_download`).
    """

    name = "hub"
    directory_loader = DirectoryLoader()

    def claims(self, spec: ModelSpec) -> bool:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        if len(spec.name.split("/")) != 2 or Path(spec.name).exists():
            return False
        try:
            validate_repo_id(spec.name)
        except HFValidationError:
            return False
        return True

    def _snapshot(self, spec: ModelSpec, patterns: list[str]) -> ModelSpec:
        from compress.hub_download import snapshot

        code = CODE_FILES if spec.trust_remote_code else []
        directory = snapshot(spec.name, "model", spec.revision, [*patterns, *code])
        if not (directory / "config.json").is_file():
            raise UserError("not a transformers model: its Hub repository has no config.json", spec.name)
        return spec.model_copy(update={"name": str(directory)})

    def load_config(self, spec: ModelSpec) -> tuple[PretrainedConfig, str]:
        local = self._snapshot(spec, ["config.json"])
        if any(Path(local.name).glob("*.safetensors")):  # the weights are cached: check them too
            return self.directory_loader.load_config(local)
        config = load_hf_config(Path(local.name), spec.trust_remote_code)
        return config, spec.task or infer_task(config)

    def weights_directory(self, spec: ModelSpec) -> Path:
        """The local snapshot's directory, downloaded first when needed."""
        return Path(self._snapshot(spec, MODEL_FILES).name)

    def load(self, spec: ModelSpec) -> LoadedModel:
        loaded = self.directory_loader.load(self._snapshot(spec, MODEL_FILES))
        loaded.base_model = spec.name
        return loaded

    def load_tokenizer(self, spec: ModelSpec, config: PretrainedConfig, task: str) -> Any:
        tokenizer_files = [pattern for pattern in MODEL_FILES if pattern != "*.safetensors"]
        return self.directory_loader.load_tokenizer(self._snapshot(spec, tokenizer_files), config, task)
