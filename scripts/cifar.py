"""The CIFAR-10 pipeline the CIFAR scripts share: the zips decoded once into uint8 tensors
held on the device, augmentation there, and a training loop (warm-up then cosine, bf16
autocast on CUDA, channels-last) with accuracy and timing helpers.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
SPLITS = {"train": "cifar10-train25k.zip", "test": "cifar10-test.zip"}
ROOT = Path(__file__).resolve().parents[1]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (the folder of the zips), ``--cache`` (the decoded tensors) and ``--out``."""
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("COMPRESS_CACHE", "/tmp/ccache")) / "cifar10")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "out")))


# --- data ----------------------------------------------------------------------------------


def decode_zip(path: Path) -> tuple[Tensor, Tensor, list[str]]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` of a zip of ``class/name.jpg`` files."""
    from PIL import Image

    def pixels(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB").tobytes()

    with zipfile.ZipFile(path) as archive:
        names = sorted(name for name in archive.namelist() if not name.endswith("/"))
        files = [archive.read(name) for name in names]
    classes = sorted({name.split("/")[0] for name in names})
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow decodes without the GIL
        raw = b"".join(pool.map(pixels, files, chunksize=256))
    images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(len(names), 32, 32, 3)
    labels = torch.tensor([classes.index(name.split("/")[0]) for name in names])
    return images.permute(0, 3, 1, 2).contiguous(), labels, classes


def load_split(data: Path, cache: Path, split: str) -> tuple[Tensor, Tensor]:
    """One split, decoded once and cached as a .pt file; classes must match across splits."""
    cached = cache / f"cifar10-{split}.pt"
    if not cached.exists():
        images, labels, classes = decode_zip(data / SPLITS[split])
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": labels, "classes": classes}, cached)
    stored = torch.load(cached)
    return stored["images"], stored["labels"]


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32x32 crops of the images zero-padded by 4, each flipped with probability 1/2."""
    n, device = images.shape[0], images.device
    padded = F.pad(images, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n, 1), device=device, generator=generator)
    flip = torch.randint(0, 2, (n, 1), device=device, generator=generator).bool()
    span = torch.arange(32, device=device)
    rows, cols = dy + span, dx + span
    cols = torch.where(flip, cols.flip(-1), cols)
    sample = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(3, device=device).view(1, 3, 1, 1)
    return padded[sample, channel, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: Tensor) -> Tensor:
    x = images.float().div_(255)
    return ((x - MEAN.to(x.device)) / STD.to(x.device)).contiguous(memory_format=torch.channels_last)


def subset(split: tuple[Tensor, Tensor], limit: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """The first ``limit`` images of a fixed shuffle (the zips are sorted by class)."""
    images, labels = split
    if limit is None:
        return split
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    return images[keep], labels[keep]


# --- training ------------------------------------------------------------------------------

Objective = Callable[[Tensor | tuple[Tensor, Tensor], Tensor | None, Tensor], Tensor]


def ce(output: Tensor, teacher: Tensor | None, labels: Tensor) -> Tensor:
    return F.cross_entropy(output.float(), labels)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main_logits(output: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        with autocast(device):
            logits = main_logits(model(normalize(images[start : start + batch])))
        correct += (logits.argmax(-1) == labels[start : start + batch]).sum().item()
    return 100.0 * correct / len(images)


def fused(device: torch.device) -> dict[str, bool]:
    return {"fused": True} if device.type == "cuda" else {}


def train(
    model: nn.Module,
    objective: Objective,
    teacher: nn.Module | None,
    train_set: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """SGD (Nesterov, momentum 0.9, weight decay 5e-4) unless ``optimizer`` is given (at its peak
    learning rate), warm-up then cosine, fixed data order."""
    images, labels = train_set
    steps_per_epoch = max(len(images) // args.batch_size, 1)
    total = steps_per_epoch * args.epochs
    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4, **fused(device)
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / steps_per_epoch, 0.5 * (1 + math.cos(math.pi * step / total)))
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(images), device=device, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            inputs = normalize(augment(images[index], generator))
            with autocast(device):
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(inputs)
                loss = objective(model(inputs), target, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()}")


def measured(run: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """Wall seconds and peak GPU memory (GiB) of ``run``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak
