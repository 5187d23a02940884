"""A tiny ResNet image classifier and image folder for the eqnet tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_images import LABELS, save_classifier, write_images


def tiny_resnet(directory: Path) -> Path:
    """A ResNet of two stages of basic blocks, widths 8 and 16: 7 Conv2d/Linear layers."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **LABELS)
    torch.manual_seed(0)
    return save_classifier(ResNetForImageClassification(config), directory)


def run(host, directory: Path, raw: dict, resume: bool = False):
    """``compress apply`` of ``raw`` written to ``directory/recipe.yaml``; the run's context."""
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return apply_recipe(host, check_recipe(host, path, overwrite=True), overwrite=True, resume=resume)


def eqnet_recipe(model: Path, images: Path, out: Path, search: dict | None = None, **train) -> dict:
    """A recipe training the supernet for 2 steps, then (when ``search`` is given) a small search."""
    stages = [{"method": "eqnet", "steps": 2, "batch_size": 6, "init_samples": 4, "log_every": 1, **train}]
    if search is not None:
        stages.append(
            {
                "method": "eqnet_search",
                "predictor_samples": 10,
                "predictor_epochs": 2,
                "population": 4,
                "generations": 2,
                "bn_batches": 1,
                "batch_size": 6,
                **search,
            }
        )
    return {
        "model": str(model),
        "data": {
            "train": {"path": str(images), "source": "images", "samples": 12},
            "calibration": {"path": str(images), "source": "images", "samples": 6},
            "holdout": {"path": str(images), "source": "images", "samples": 6},
        },
        "stages": stages,
        "output": {"dir": str(out), "format": "dense"},
        "run": {"device": "cpu"},
    }


@pytest.fixture(scope="package")
def eqnet_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny ResNet directory, image folder of 3 classes x 6 images)."""
    root = tmp_path_factory.mktemp("eqnet")
    return tiny_resnet(root / "model"), write_images(root / "images", ["cat", "dog", "frog"], 6)


@pytest.fixture(scope="package")
def run_once(eqnet_assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """``run_once(label, recipe)``: applies ``recipe(model, images, out)`` (a recipe for the tiny ResNet
    and its images, writing to ``out``) in a fresh directory named ``label`` on a host of its own;
    ``(context, out)``. What a module's tests share (a trained supernet, a search after it)."""
    from compress.host import PluginHost

    def apply(label: str, recipe: Callable[[Path, Path, Path], dict]):
        host = PluginHost()
        host.load_plugins()
        model, images = eqnet_assets
        directory = tmp_path_factory.mktemp(label)
        return run(host, directory, recipe(model, images, directory / "out")), directory / "out"

    return apply


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and two threads on a busy machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
