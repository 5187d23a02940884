"""Image classification: the ``images`` data source, the default image processor and the metrics.

The data is one folder per class, either a directory (``root/<class>/<image>``) or a zip
file holding the same layout (``cifar10-test.zip``: ``airplane/0000.jpg`` ...), read with
``zipfile`` and Pillow. Class ``i`` is the ``i``-th folder name in sorted order; a model
whose ``id2label`` names its classes must name them the same, in the same order.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from compress.data import Batch, Sample
from compress.errors import UserError
from compress.evaluate import Metric, MetricParams
from compress.recipe import DataSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IMAGE_TASK = "image-classification"
PROCESS_CHUNK = 256
"""Images handed to the image processor at once."""


@dataclass(frozen=True)
class ImageFolder:
    """The image files of a directory or zip, by class: ``{class: [file names, sorted]}``."""

    path: Path
    classes: dict[str, list[str]]

    @classmethod
    def open(cls, path: Path) -> ImageFolder:
        """List ``path`` (a directory or a .zip); UserError when it holds no class folders of images."""
        from PIL import Image

        extensions = set(Image.registered_extensions())
        if path.is_dir():
            names = [file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file()]
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if not name.endswith("/")]
        elif path.exists():
            raise UserError("image data must be a directory or a .zip of one folder per class", str(path))
        else:
            raise UserError("image data not found", str(path))
        classes: dict[str, list[str]] = {}
        for name in sorted(names):
            member = PurePosixPath(name)
            if member.suffix.lower() in extensions and len(member.parts) >= 2:
                classes.setdefault(member.parent.name, []).append(name)
        if not classes:
            raise UserError("no images in class folders (expected <class>/<image>.jpg)", str(path))
        return cls(path, dict(sorted(classes.items())))

    @property
    def labels(self) -> list[str]:
        """Class names; a class's index is its label."""
        return list(self.classes)

    def balanced(self, samples: int) -> list[tuple[str, int]]:
        """``samples`` (file, label) pairs, as even over the classes as they divide, the first files
        of each class by name, interleaved class by class (so any prefix is balanced too)."""
        count = len(self.classes)
        picked = []
        for label, (name, files) in enumerate(self.classes.items()):
            share = samples // count + (label < samples % count)
            if len(files) < share:
                raise UserError(
                    f"class {name!r} has {len(files)} images, fewer than its share {share} of samples: {samples}",
                    str(self.path),
                )
            picked.append([(file, label) for file in files[:share]])
        order = []
        for rank in range(len(picked[0])):  # the first classes have the largest shares
            order += [files[rank] for files in picked if rank < len(files)]
        return order

    def read(self, files: list[str]) -> list[Any]:
        """The named files as RGB Pillow images."""
        from PIL import Image, UnidentifiedImageError

        images = []
        with self._opened() as read:
            for file in files:
                try:
                    with Image.open(io.BytesIO(read(file))) as image:
                        images.append(image.convert("RGB"))
                except (UnidentifiedImageError, OSError) as error:
                    raise UserError(f"unreadable image: {error}", f"{self.path}:{file}") from None
        return images

    @contextmanager
    def _opened(self) -> Iterator[Callable[[str], bytes]]:
        """A function reading a file of the folder by name."""
        if self.path.is_dir():
            yield lambda name: (self.path / name).read_bytes()
            return
        with zipfile.ZipFile(self.path) as archive:
            yield archive.read


def default_image_processor(config: PretrainedConfig) -> Any:
    """What preprocesses images for a checkpoint saved without an image processor: resize to
    the config's ``image_size`` (224 when it has none), scale to [0, 1], normalize with mean
    and standard deviation 0.5 per channel (``ViTImageProcessor``'s defaults)."""
    from transformers import ViTImageProcessor

    size = getattr(config, "image_size", None) or 224
    return ViTImageProcessor(size={"height": size, "width": size})


def is_image_processor(processor: Any) -> bool:
    """Whether ``processor`` (what the loader found beside the weights) preprocesses images."""
    from transformers import ImageProcessingMixin

    return isinstance(processor, ImageProcessingMixin)


class ImageFolderSource:
    """One folder per class, in a directory or a zip (``root/<class>/<image>``), for image classifiers.

    Labels are the class folders' indices in sorted order. ``samples`` images are taken as
    evenly over the classes as they divide (the first files of each class by name, classes
    interleaved); each is preprocessed by the model's image processor into ``pixel_values``
    ``(C, H, W)``, with its class index as the 0-d ``labels``. ``seq_len`` and ``field`` are
    not used.
    """

    name = "images"

    def check(self, spec: DataSpec) -> None:
        if spec.loss_on != "all" or spec.field or spec.prompt_field:
            raise UserError("image data has no fields and no answers; loss_on, field, prompt_field are for jsonl/chat")
        ImageFolder.open(spec.path).balanced(spec.samples)

    def check_model(self, spec: DataSpec, task: str, config: PretrainedConfig) -> None:
        """The model is an image classifier whose head has one output per class folder (and whose
        ``id2label``, when it names the classes, names the folders in sorted order)."""
        if task != IMAGE_TASK:
            raise UserError(f"image data needs an image-classification model, but the model is a {task} model")
        labels = ImageFolder.open(spec.path).labels
        if config.num_labels != len(labels):
            raise UserError(
                f"the data has {len(labels)} classes but the model's classifier head has "
                f"num_labels = {config.num_labels}"
            )
        names = [config.id2label[index] for index in range(config.num_labels)]
        if names != [f"LABEL_{index}" for index in range(len(names))] and names != labels:
            raise UserError(f"the data's classes {labels} are not the model's id2label {names}")

    def load(self, spec: DataSpec, processor: Any) -> list[Sample]:
        if not is_image_processor(processor):
            raise UserError("image data needs the model's image processor, and the model has none", str(spec.path))
        folder = ImageFolder.open(spec.path)
        chosen = folder.balanced(spec.samples)
        samples = []
        for start in range(0, len(chosen), PROCESS_CHUNK):
            files, labels = zip(*chosen[start : start + PROCESS_CHUNK])
            pixels = processor(images=folder.read(list(files)), return_tensors="pt")["pixel_values"]
            samples += [
                {"pixel_values": image, "labels": torch.tensor(label)} for image, label in zip(pixels.float(), labels)
            ]
        return samples


class ClassMetric(Metric):
    """A metric over image classifiers' logits ``(batch, classes)``."""

    tasks: ClassVar[frozenset[str]] = frozenset({IMAGE_TASK})


class Accuracy(ClassMetric):
    """Top-1 accuracy against the data's labels, of the original and of the compressed model."""

    name = "accuracy"

    def __init__(self, params: MetricParams | None = None) -> None:
        super().__init__(params)
        self.correct = {"original": 0, "compressed": 0}
        self.count = 0

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        labels = batch["labels"].to(original.logits.device)
        for key, output in (("original", original), ("compressed", compressed)):
            self.correct[key] += int((output.logits.argmax(-1) == labels).sum())
        self.count += labels.numel()

    def result(self) -> dict[str, float]:
        return {key: correct / self.count for key, correct in self.correct.items()}


class ImageMean(ClassMetric):
    """The mean over images of a per-image comparison of the two models (``per_image``)."""

    def __init__(self, params: MetricParams | None = None) -> None:
        super().__init__(params)
        self.total = 0.0
        self.count = 0

    def per_image(self, original: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
        """One value per image of the batch, from both models' logits ``(batch, classes)``."""
        raise NotImplementedError

    def update(self, original: Any, compressed: Any, batch: Batch) -> None:
        values = self.per_image(original.logits.float(), compressed.logits.float())
        self.total += values.sum().item()
        self.count += values.numel()

    def result(self) -> dict[str, float]:
        return {"compressed": self.total / self.count}


class Agreement(ImageMean):
    """Fraction of images for which the compressed model predicts the original's top-1 class."""

    name = "agreement"

    def per_image(self, original: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
        return (original.argmax(-1) == compressed.argmax(-1)).float()


class ClassKL(ImageMean):
    """Mean over images of KL(original || compressed) of the class distributions, in nats."""

    name = "class_kl"

    def per_image(self, original: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
        p_log, q_log = F.log_softmax(original, dim=-1), F.log_softmax(compressed, dim=-1)
        return (p_log.exp() * (p_log - q_log)).sum(-1)


IMAGE_METRICS: tuple[type[Metric], ...] = (Accuracy, Agreement, ClassKL)
