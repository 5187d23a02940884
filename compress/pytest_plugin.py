"""pytest fixtures for plugin authors, loaded in every pytest run once ``compress`` is
installed (the ``pytest11`` entry point ``compress``).

- ``compress_host``: a fresh :class:`compress.host.PluginHost` with the installed plugins
  loaded, which is also what ``compress.host.get_host()`` returns during the test;
- ``register_plugin``: ``register_plugin(module_or_object, name=None)`` registers a plugin
  on that host for one test and returns the host;
- ``tiny_model_dir``: a two-layer Llama (hidden size 64) with random weights and a
  byte-level tokenizer, built once per session; no download, no pretrained model;
- ``tiny_text_file``: a small English text file for ``data:`` entries;
- ``run_recipe``: ``run_recipe(recipe)`` runs a recipe (a dict, YAML text or a file) on
  the tiny model through the same path as ``compress apply`` and returns a
  :class:`RecipeRun`.

Importing this module is cheap: torch and transformers are imported by the fixtures.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from compress.context import Context
    from compress.host import PluginHost

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model is compressed when its weights "
    "take fewer bits, when some of them are zero, or when a smaller model learns from it. "
    "Every method is a plugin, and every plugin is tested on a tiny model first.\n"
)


@dataclass
class RecipeRun:
    """What ``run_recipe`` returns."""

    context: Context
    """The finished run: ``context.model`` (compressed), ``context.layers``, ``context.report``."""
    recipe_file: Path
    """The recipe as run (model and output replaced)."""
    output: Path | None
    """The output directory, when the recipe has ``output:``."""

    @property
    def report(self) -> dict[str, Any]:
        """What report.json holds."""
        return self.context.report.to_json()


@pytest.fixture
def compress_host(monkeypatch: pytest.MonkeyPatch) -> PluginHost:
    """A fresh plugin host with the installed plugins loaded; ``get_host()`` returns it in this test."""
    from compress import host as host_module

    plugin_host = host_module.PluginHost()
    plugin_host.load_plugins()
    monkeypatch.setattr(host_module, "_host", plugin_host)
    return plugin_host


@pytest.fixture
def register_plugin(compress_host: PluginHost) -> Callable[..., PluginHost]:
    """Register a plugin module or object on ``compress_host`` for this test.

    A plugin that is already loaded (installed, found through its entry point) stays
    registered as it is.
    """

    def register(plugin: object, name: str | None = None) -> PluginHost:
        if not compress_host.pm.is_registered(plugin):
            compress_host.register(plugin, name=name)
        return compress_host

    return register


def build_tiny_model(directory: Path) -> Path:
    """Save a two-layer Llama with random weights and a 256-byte tokenizer into ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer Llama with random weights and a byte-level tokenizer (about 0.2 MB)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 8 KB of English text: enough for 8 samples of 256 byte-level tokens."""
    path = tmp_path_factory.mktemp("tiny-text") / "text.txt"
    path.write_text(TINY_TEXT * 40, encoding="utf-8")
    return path


@pytest.fixture
def run_recipe(
    compress_host: PluginHost, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> Callable[[dict | str | Path], RecipeRun]:
    """Run a recipe on the tiny model, as ``compress apply`` would.

    ``model:`` is replaced by the tiny model and ``output.dir`` by a fresh directory under
    ``tmp_path``; a recipe without ``data:`` gets ``calibration`` and ``evaluation``
    entries (4 samples of 32 tokens of ``tiny_text_file``).
    """
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    runs = itertools.count()

    def run(recipe: dict | str | Path) -> RecipeRun:
        if isinstance(recipe, Path):
            recipe = recipe.read_text(encoding="utf-8")
        raw = dict(yaml.safe_load(recipe) if isinstance(recipe, str) else recipe)
        number = next(runs)
        raw["model"] = str(tiny_model_dir)
        data = {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}
        raw.setdefault("data", {"calibration": data, "evaluation": data})
        if raw.get("output") is not None:
            raw["output"] = {**raw["output"], "dir": str(tmp_path / f"out-{number}")}
        recipe_file = tmp_path / f"recipe-{number}.yaml"
        recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        context = apply_recipe(compress_host, check_recipe(compress_host, recipe_file))
        output = Path(raw["output"]["dir"]) if raw.get("output") is not None else None
        return RecipeRun(context, recipe_file, output)

    return run
