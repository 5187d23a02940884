"""DMM and KLOM: TRAK against real retraining on logistic regression, the matching stage on a tiny
ResNet through a recipe, KLOM by hand and through evaluate:, and the refusals at recipe check."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from torch import nn

import compress_unlearn
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.validate import check_recipe
from compress_unlearn.klom import klom
from compress_unlearn.trak import Checkpoint, Projector, RemovalPredictor, features, kernel_inverse, margins
from tests.test_images import CLASSES, LABELS, save_classifier, write_images

# --- TRAK against retraining ---------------------------------------------------------------


class Linear(nn.Module):
    """Logistic regression called like an image classifier."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(inputs, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(pixel_values)


def fit(x: torch.Tensor, y: torch.Tensor) -> Linear:
    """The L2-regularized maximum-likelihood fit (convex: one optimum, whatever the start)."""
    torch.manual_seed(1)
    model = Linear(x.shape[1], 2)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") + 5e-3 * penalty
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return model


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


def test_trak_predicts_what_retraining_without_the_forget_set_changes():
    """On logistic regression TRAK is one Newton step with the Hessian's p(1 − p) weights dropped: where
    they vary little (a weak signal), the predicted margin changes are proportional to real retraining's."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=generator)
    probabilities = torch.sigmoid(x @ torch.randn(8, generator=generator) * 0.5)
    y = torch.bernoulli(probabilities, generator=generator).long()
    full = fit(x, y)
    targets = torch.randn(100, 8, generator=generator)
    target_labels = torch.randint(0, 2, (100,), generator=generator)
    checkpoint = Checkpoint(full)
    projector = Projector(checkpoint.size, 64, 0, torch.device("cpu"))  # 18 parameters: unprojected
    phi, _ = features(checkpoint, projector, [(x, y)])
    kernels = [kernel_inverse(phi, 0.0)]

    def actual(forget: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(x), dtype=torch.bool).index_fill(0, forget, False)
        with torch.no_grad():
            return margins(fit(x[keep], y[keep])(targets), target_labels) - margins(full(targets), target_labels)

    def predicted(forget: torch.Tensor) -> torch.Tensor:
        change = RemovalPredictor([checkpoint], projector, kernels, [(x[forget], y[forget])]).change(targets)
        with torch.no_grad():
            base = full(targets)
        return margins(base + change, target_labels) - margins(base, target_labels)

    first, second = torch.arange(0, 20), torch.arange(20, 40)
    assert correlation(predicted(first), actual(first)) > 0.9
    # what tells two forget sets apart, not only what any removal of 20 points does
    assert correlation(predicted(first) - predicted(second), actual(first) - actual(second)) > 0.9


def test_projection_is_seeded_and_lift_is_its_transpose():
    projector = Projector(1000, 16, 3, torch.device("cpu"))
    vectors, u = torch.randn(4, 1000), torch.randn(16)
    assert torch.equal(projector.project(vectors), Projector(1000, 16, 3, torch.device("cpu")).project(vectors))
    assert torch.allclose(projector.project(vectors) @ u, vectors @ projector.lift(u), rtol=1e-4, atol=1e-3)


# --- KLOM ------------------------------------------------------------------------------------


def test_klom_is_zero_for_the_same_samples_and_positive_for_shifted_ones():
    generator = torch.Generator().manual_seed(0)
    oracle = torch.randn(50, 7, generator=generator)
    assert klom(oracle, oracle).abs().max() < 1e-12
    assert (klom(oracle + 3.0, oracle) > 1.0).all()


def test_klom_matches_binned_scipy_entropy_by_hand():
    generator = torch.Generator().manual_seed(1)
    unlearned, oracle = torch.randn(40, 1, generator=generator) + 0.5, torch.randn(30, 1, generator=generator)
    edges = np.linspace(min(unlearned.min(), oracle.min()), max(unlearned.max(), oracle.max()), 21)
    p = np.histogram(unlearned.numpy(), edges)[0] / 40
    q = np.histogram(oracle.numpy(), edges)[0] / 30
    expected = stats.entropy(p, np.where(p > 0, np.maximum(q, 1e-5), q))
    assert klom(unlearned, oracle).item() == pytest.approx(expected, rel=1e-9)


# --- the dmm stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """forget.zip (1 image per class) and retain.zip (3 per class) of the test images' layout."""
    root = tmp_path_factory.mktemp("dmm")
    images = write_images(root / "all", CLASSES, 4)
    zips = {}
    for name, members in (("forget", slice(0, 1)), ("retain", slice(1, 4))):
        zips[name] = root / f"{name}.zip"
        with zipfile.ZipFile(zips[name], "w") as archive:
            for label in CLASSES:
                for file in sorted((images / label).glob("*.png"))[members]:
                    archive.write(file, f"{label}/{file.name}")
    return zips


@pytest.fixture(scope="module")
def resnets(tmp_path_factory):
    """Two tiny ResNets (seeds 0 and 1) with trained-looking batch-norm statistics."""
    from transformers import ResNetConfig, ResNetForImageClassification

    directories = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **LABELS)
        model = ResNetForImageClassification(config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_var.uniform_(0.5, 2.0)
        directories.append(save_classifier(model, tmp_path_factory.mktemp(f"resnet{seed}")))
    return directories


@pytest.fixture
def host(register_plugin):
    return register_plugin(compress_unlearn, "unlearn")


def dmm_recipe(tmp_path, image_sets, resnets, data=None, **stage):
    raw = {
        "model": str(resnets[0]),
        "data": data
        or {name: {"path": str(path), "source": "images", "samples": 3} for name, path in image_sets.items()},
        # one batch is each whole set: every step matches the same images
        "stages": [{"method": "dmm", "steps": 4, "batch_size": 3, "lr": 5e-3, "log_every": 1, **stage}],
        "run": {"device": "cpu", "mode": "whole"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dmm_matches_the_predicted_logits_and_klom_runs_in_evaluate(host, tmp_path, image_sets, resnets):
    cache = tmp_path / "kernels.safetensors"
    stage = {"checkpoints": [str(d) for d in resnets], "projection_dim": 32, "kernel_cache": str(cache)}
    path = dmm_recipe(tmp_path, image_sets, resnets, **stage)
    raw = yaml.safe_load(path.read_text())
    raw["evaluate"] = [{"metric": "klom", "data": "forget", "oracles": [str(resnets[1])]}]
    path.write_text(yaml.safe_dump(raw))
    context = apply_recipe(host, check_recipe(host, path))

    record = context.report.stages[0]
    curve = [value for _, value in record.details["loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]
    assert record.details["trak"] == {"checkpoints": 2, "projection_dim": 32}
    (klom_result,) = (value for key, value in context.report.evaluation.items() if key.startswith("klom"))
    assert klom_result["compressed"] >= 0 and klom_result["p95"] >= 0
    assert cache.is_file()

    written = cache.stat().st_mtime_ns
    raw["stages"][0]["steps"], raw["evaluate"] = 1, []
    path.write_text(yaml.safe_dump(raw))
    apply_recipe(host, check_recipe(host, path))  # same kernel settings: the kernels are read back
    assert cache.stat().st_mtime_ns == written


@pytest.mark.parametrize("missing", ["forget", "retain"])
def test_dmm_without_forget_or_retain_is_refused_at_check(host, tmp_path, image_sets, resnets, missing):
    data = {
        name: {"path": str(p), "source": "images", "samples": 3} for name, p in image_sets.items() if name != missing
    }
    with pytest.raises(UserError, match=f"reads data: {missing}:"):
        check_recipe(host, dmm_recipe(tmp_path, image_sets, resnets, data=data))


def test_dmm_with_an_unknown_kernel_entry_is_refused(host, tmp_path, image_sets, resnets):
    with pytest.raises(UserError, match="kernel_data"):
        check_recipe(host, dmm_recipe(tmp_path, image_sets, resnets, kernel_data="train"))
