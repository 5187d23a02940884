"""Image classifiers: the images data source, ViT and ResNet through both engines, the image metrics,
and the bad inputs that mix image data and text models."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress.cli import cli
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.images import Accuracy, Agreement, ClassKL, ImageFolder, ImageFolderSource
from compress.recipe import DataSpec
from compress.sequential import find_blocks
from compress.validate import check_recipe
from tests.models import tiny_vit_config

CLASSES = ["cat", "dog", "frog"]
PER_CLASS = 6


def write_images(root: Path, classes: list[str], per_class: int) -> Path:
    """``root/<class>/<n>.png``: 32x32 images whose mean colour depends on the class."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            noise = torch.randint(0, 96, (32, 32, 3), generator=generator, dtype=torch.uint8)
            pixels = (noise + 60 * label).numpy()
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("images") / "train", CLASSES, PER_CLASS)


@pytest.fixture(scope="module")
def image_zip(image_dir: Path) -> Path:
    """The same images in a stored zip, one folder per class (the CIFAR zips' layout)."""
    path = image_dir.parent / "train.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(image_dir.rglob("*.png")):
            archive.write(file, file.relative_to(image_dir).as_posix())
    return path


def save_classifier(model: torch.nn.Module, directory: Path, processor: bool = True) -> Path:
    from transformers import ViTImageProcessor

    model.save_pretrained(directory)
    if processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.3] * 3).save_pretrained(
            directory
        )
    return directory


LABELS = {"id2label": dict(enumerate(CLASSES)), "label2id": {name: i for i, name in enumerate(CLASSES)}}


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer ViT for 32x32 images, patches of 8, width 32 (about 30k parameters)."""
    from transformers import ViTForImageClassification

    config = tiny_vit_config(image_size=32, **LABELS)
    torch.manual_seed(0)
    return save_classifier(ViTForImageClassification(config), tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet of two stages of basic blocks, widths 8 and 16 (about 6k parameters)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **LABELS)
    torch.manual_seed(0)
    model = ResNetForImageClassification(config)
    with torch.no_grad():  # batch-norm statistics of a trained model, so the compressed one is comparable
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.normal_(0, 0.1)
    return save_classifier(model, tmp_path_factory.mktemp("resnet"))


def processor_of(directory: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(directory)


def spec(path: Path, samples: int = 9) -> DataSpec:
    return DataSpec(path=path, source="images", samples=samples)


# --- the data source -----------------------------------------------------------------------


def test_balanced_subset_interleaves_classes_and_takes_the_first_files(image_dir):
    chosen = ImageFolder.open(image_dir).balanced(5)
    assert [label for _, label in chosen] == [0, 1, 2, 0, 1]
    assert [file for file, _ in chosen] == ["cat/00.png", "dog/00.png", "frog/00.png", "cat/01.png", "dog/01.png"]


def test_zip_and_directory_give_the_same_samples(image_dir, image_zip, vit_dir):
    processor = processor_of(vit_dir)
    from_dir = ImageFolderSource().load(spec(image_dir), processor)
    from_zip = ImageFolderSource().load(spec(image_zip), processor)
    assert len(from_dir) == 9
    for a, b in zip(from_dir, from_zip):
        assert a.keys() == {"pixel_values", "labels"}
        assert a["pixel_values"].shape == (3, 32, 32) and a["pixel_values"].dtype == torch.float32
        assert a["labels"].shape == () and a["labels"].dtype == torch.long
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["labels"] == b["labels"]
    # the processor's normalization: (x / 255 - 0.4) / 0.3
    assert from_dir[0]["pixel_values"].min() >= -0.4 / 0.3 - 1e-6


def test_a_class_with_too_few_images_is_refused(image_dir):
    with pytest.raises(UserError, match=r"class 'cat' has 6 images, fewer than its share 7 of samples: 21"):
        ImageFolderSource().check(spec(image_dir, samples=21))


def test_a_folder_without_class_folders_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(UserError, match=r"no images in class folders"):
        ImageFolderSource().check(spec(tmp_path))
    with pytest.raises(UserError, match=r"must be a directory or a .zip"):
        ImageFolderSource().check(spec(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match=r"image data not found"):
        ImageFolderSource().check(spec(tmp_path / "missing.zip"))


def test_an_unreadable_image_is_named(tmp_path, vit_dir):
    data = write_images(tmp_path / "data", CLASSES, 1)
    (data / "dog" / "00.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="unreadable image") as error:
        ImageFolderSource().load(spec(data, samples=3), processor_of(vit_dir))
    assert error.value.where == f"{data}:dog/00.png"


def test_a_tokenizer_is_not_an_image_processor(tmp_path, image_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match="image data needs the model's image processor"):
        ImageFolderSource().load(spec(image_dir), AutoTokenizer.from_pretrained(tiny_model_dir))


def test_a_checkpoint_without_image_processor_gets_the_default(tmp_path, image_dir):
    from transformers import ViTForImageClassification

    from compress.checkpoint.loaders import DirectoryLoader
    from compress.recipe import ModelSpec

    config = tiny_vit_config(hidden_size=16, num_hidden_layers=1, intermediate_size=32, **LABELS)
    save_classifier(ViTForImageClassification(config), tmp_path / "bare", processor=False)
    loaded = DirectoryLoader().load(ModelSpec(name=str(tmp_path / "bare")))
    samples = ImageFolderSource().load(spec(image_dir, samples=3), loaded.tokenizer)
    assert samples[0]["pixel_values"].shape == (3, 16, 16)  # resized to the config's image_size
    assert samples[0]["pixel_values"].min() >= -1.0 and samples[0]["pixel_values"].max() <= 1.0


# --- metrics -------------------------------------------------------------------------------


class Output:
    def __init__(self, logits: list[list[float]]) -> None:
        self.logits = torch.tensor(logits)


def test_image_metrics_by_hand():
    original = Output([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    compressed = Output([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    batch = {"labels": torch.tensor([0, 2])}
    metrics = [Accuracy(), Agreement(), ClassKL()]
    for metric in metrics:
        metric.update(original, compressed, batch)
    assert metrics[0].result() == {"original": 0.5, "compressed": 0.5}
    assert metrics[1].result() == {"compressed": 0.5}
    p, q = original.logits.log_softmax(-1), compressed.logits.log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert metrics[2].result()["compressed"] == pytest.approx(expected, rel=1e-6)


# --- models through the engines ------------------------------------------------------------


def test_conv_input_rows_times_the_weight_matrix_is_the_convolution():
    from compress.hessian import input_rows
    from compress.quant import weight_matrix

    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    rows = input_rows(conv, x)
    expected = conv(x).flatten(2).transpose(1, 2).flatten(0, 1)
    torch.testing.assert_close(rows @ weight_matrix(conv.weight).T, expected)


def test_find_blocks_of_vit_and_resnet(vit_dir, resnet_dir):
    from transformers import AutoModelForImageClassification

    vit = AutoModelForImageClassification.from_pretrained(vit_dir)
    resnet = AutoModelForImageClassification.from_pretrained(resnet_dir)
    assert find_blocks(vit)[0] == "vit.layers"
    name, stages = find_blocks(resnet)
    assert name == "resnet.encoder.stages" and len(stages) == 2  # stages of different widths


def run_image_recipe(host, tmp_path: Path, model: Path, data: Path, stage: dict, mode: str):
    raw = {
        "model": str(model),
        "data": {
            "calibration": {"path": str(data), "source": "images", "samples": 6},
            "evaluation": {"path": str(data), "source": "images", "samples": 12},
        },
        "stages": [stage],
        "output": {"dir": str(tmp_path / "out"), "format": "dense"},
        "evaluate": ["accuracy", "agreement", "class_kl"],
        "run": {"mode": mode, "device": "cpu"},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return apply_recipe(host, check_recipe(host, recipe)), tmp_path / "out"


RESNET_CONV = "re:resnet\\.encoder\\..*convolution$"


@pytest.mark.parametrize("mode", ["whole", "sequential"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_classifier_quantized_and_written_dense(host, tmp_path, image_zip, vit_dir, resnet_dir, model, method, mode):
    from transformers import AutoModelForImageClassification

    # the convolutions' widths (8 x 3 x 3, ...) take one scale per output channel
    directory, targets, group_size = (vit_dir, ["Linear"], 16) if model == "vit" else (resnet_dir, [RESNET_CONV], None)
    stage = {"method": method, "bits": 4, "group_size": group_size, "targets": targets, "ignore": ["classifier"]}
    context, out = run_image_recipe(host, tmp_path, directory, image_zip, stage, mode)

    layers = context.report.stages[0].layers
    assert len(layers) == {"vit": 12, "resnet": 5}[model]  # every targeted layer, in every block
    assert all(name.startswith(("vit.layers.", "resnet.encoder.stages.")) for name in layers)
    original = AutoModelForImageClassification.from_pretrained(directory)
    modules = dict(context.model.named_modules())
    for name in layers:
        weight = modules[name].weight.detach()
        assert not torch.equal(weight, original.get_submodule(name).weight)
        groups = weight.flatten(1).unflatten(1, (-1, group_size or weight[0].numel()))
        assert all(len(group.unique()) <= 16 for group in groups.flatten(0, 1))  # 4-bit codes per group

    if method == "gptq":  # the output error through H beats rounding to nearest on the same grid
        assert sum(d["objective"] for d in layers.values()) < sum(d["rtn_objective"] for d in layers.values())
    evaluation = context.report.evaluation
    assert set(evaluation) == {"accuracy", "agreement", "class_kl"}
    assert evaluation["accuracy"]["samples"] == 12
    assert 0 <= evaluation["agreement"]["compressed"] <= 1 and evaluation["class_kl"]["compressed"] >= 0

    written = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("evaluation")])
    with torch.no_grad():
        assert torch.equal(written(pixel_values=pixels).logits, context.model(pixel_values=pixels).logits)
    assert (out / "preprocessor_config.json").is_file()


# --- bad input -----------------------------------------------------------------------------


def assert_refused(recipe: Path, pattern: str, out: Path) -> None:
    result = CliRunner().invoke(cli, ["apply", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert pattern in lines[0], lines[0]
    assert str(recipe) in lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))


def bad_recipe(tmp_path: Path, model: Path, data: dict) -> Path:
    raw = {
        "model": str(model),
        "data": {"calibration": data},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 16}],
        "output": {"dir": str(tmp_path / "out")},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def test_image_data_for_a_text_model_is_refused(tmp_path, tiny_model_dir, image_zip):
    recipe = bad_recipe(tmp_path, tiny_model_dir, {"path": str(image_zip), "source": "images", "samples": 3})
    assert_refused(
        recipe, "image data needs an image-classification model, but the model is a causal-lm model", tmp_path / "out"
    )


def test_text_data_for_an_image_model_is_refused(tmp_path, vit_dir, tiny_text_file):
    recipe = bad_recipe(tmp_path, vit_dir, {"path": str(tiny_text_file), "samples": 2, "seq_len": 16})
    assert_refused(recipe, "text data holds text, but the model is an image classifier", tmp_path / "out")


def test_a_label_count_other_than_the_head_is_refused(tmp_path, vit_dir):
    data = write_images(tmp_path / "four", [*CLASSES, "horse"], 2)
    recipe = bad_recipe(tmp_path, vit_dir, {"path": str(data), "source": "images", "samples": 4})
    assert_refused(
        recipe, "the data has 4 classes but the model's classifier head has num_labels = 3", tmp_path / "out"
    )


def test_classes_named_otherwise_than_id2label_are_refused(tmp_path, vit_dir):
    data = write_images(tmp_path / "other", ["ant", "bee", "cow"], 2)
    recipe = bad_recipe(tmp_path, vit_dir, {"path": str(data), "source": "images", "samples": 3})
    assert_refused(recipe, "the data's classes ['ant', 'bee', 'cow'] are not the model's id2label", tmp_path / "out")


def test_gptq_refuses_a_grouped_convolution():
    from compress_gptq.method import GPTQ, GPTQParams

    with pytest.raises(UserError, match="gptq handles Conv2d layers with groups 1 and numeric zero padding only"):
        GPTQ(GPTQParams(bits=4)).check_layer("depthwise", torch.nn.Conv2d(4, 4, 3, groups=4))


def test_compressed_tensors_refuses_quantized_convolutions_at_recipe_check(tmp_path, resnet_dir, image_zip):
    raw = {
        "model": str(resnet_dir),
        "data": {"calibration": {"path": str(image_zip), "source": "images", "samples": 3}},
        "stages": [{"method": "rtn", "targets": ["Conv2d"], "bits": 4, "group_size": None}],
        "output": {"dir": str(tmp_path / "out"), "format": "compressed-tensors"},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["recipe", "check", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "output format 'compressed-tensors' stores compressed Linear layers only" in result.stderr
    assert "(Conv2d)" in result.stderr and f"{recipe}:" in result.stderr
    assert_refused(recipe, "stores compressed Linear layers only", tmp_path / "out")
