"""Shared fixtures: a real pretrained model cut to two layers, recipes, data paths."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COMPRESS_TEST_DATA", ROOT.parent / "shared" / "data"))
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"
WIKITEXT_TEST = DATA / "wikitext-2" / "test.txt"

# A run started in the background by a shell without job control (`pytest &` in a script) inherits
# SIGINT ignored, and so would every `compress` child; the interrupt tests need it delivered as from
# a terminal. (A handled signal is reset to the default in children, which then raise KeyboardInterrupt.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # keeps the one-time SmolLM2 conversion out of ~/.cache unless the caller chose a cache
    os.environ.setdefault("COMPRESS_CACHE", str(tmp_path_factory.mktemp("compress-cache")))


@pytest.fixture(scope="session")
def smollm2_dir(_cache_dir: None) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF package to a safetensors directory."""
    from compress.checkpoint.builtin import BuiltinLoader

    return BuiltinLoader().directory("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_lm_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's real weights, first two decoder layers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("smollm2-2layers")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.config.layer_types = model.config.layer_types[:2] if getattr(model.config, "layer_types", None) else None
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compress.checkpoint.builtin import BuiltinLoader

    return BuiltinLoader().directory("all-minilm-l6-v2")


@pytest.fixture
def host(compress_host):
    """A fresh plugin host with the installed plugins loaded (``compress.pytest_plugin``)."""
    return compress_host


@pytest.fixture
def write_recipe(tmp_path: Path, tiny_lm_dir: Path):
    """Write a recipe for the two-layer model; keyword arguments replace top-level keys."""

    def write(text: str | None = None, **overrides) -> Path:
        path = tmp_path / "recipe.yaml"
        if text is not None:
            path.write_text(text)
            return path
        recipe = {
            "model": str(tiny_lm_dir),
            "data": {
                "calibration": {"path": str(WIKITEXT_VALID), "samples": 4, "seq_len": 64},
                "evaluation": {"path": str(WIKITEXT_TEST), "samples": 2, "seq_len": 64},
            },
            "stages": [{"method": "rtn", "bits": 4, "group_size": 64}],
            "output": {"dir": str(tmp_path / "out")},
            "evaluate": ["perplexity", "kl", "top1"],
        }
        recipe.update(overrides)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write
