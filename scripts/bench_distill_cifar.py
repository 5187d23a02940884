"""CIFAR-10 distillation benchmark: one teacher, one small student, four training objectives (GPU).

A ResNet-18 (CIFAR variant: 3x3 stem, no max-pool) teacher is trained on the 25,000
training images of ``--data`` (``cifar10-train25k.zip``: half of CIFAR-10's training set,
2,500 per class), then a ResNet-8 student (one basic block per stage, widths 16/32/64,
78k parameters) is trained from the same seed, the same data order and the same number of
epochs with each objective:

* ``ce``: cross-entropy on the labels;
* ``kd``: 0.1 cross-entropy + 0.9 forward KL at T = 4 (Hinton et al. 2015, with the T^2
  factor; the weights of CRD's CIFAR setting, Tian et al. 2020);
* ``pld``: cross-entropy + Plackett-Luce distillation at T = 1 (Bassam et al. 2025);
* ``dhkd``: cross-entropy on the main head + DHKD's BinaryKL-Norm at T = 2 on an auxiliary
  linear head (Yang et al. 2024; their CIFAR weights 1 and 1). Prediction uses the main head.

The distillation losses are ``compress_distill.losses``, the ones recipes use. Reported:
top-1 on the 10,000 test images for the teacher and each student, wall time of each
training run (teacher forward passes included for the distilled students) and its peak
GPU memory (the data and the teacher, held on the GPU throughout, included), as a
markdown table and as JSON in ``--out``/bench_distill_cifar.json.

Training runs entirely on the device: the images are decoded once from the zips
(zipfile + Pillow) into uint8 tensors cached under ``--cache``, held on the GPU, and
augmented there per batch (random crop with 4 pixels of zero padding, horizontal flip);
SGD with Nesterov momentum, one epoch of linear warm-up then cosine decay, bf16 autocast
on CUDA, channels-last.

Usage::

    python -m scripts.bench_distill_cifar --out OUT                          # H100: about 5 minutes
    python -m scripts.bench_distill_cifar --epochs 1 --limit 512 --teacher-width 16 --out /tmp/x  # CPU check

The data pipeline and the training loop are ``scripts.cifar``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress_distill.losses import DualHead, dhkd, forward_kl, pld
from scripts.cifar import Objective, accuracy, add_data_arguments, ce, load_split, measured, subset, train

# --- models --------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            if stride != 1 or inputs != outputs
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, stages of basic blocks (the first at stride 1, the others 2),
    global average pooling, then a linear head or a :class:`DualHead`."""

    def __init__(self, widths: tuple[int, ...], blocks: int, classes: int = 10, dual_head: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, inputs = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks):
                layers.append(BasicBlock(inputs, width, 2 if stage > 0 and block == 0 else 1))
                inputs = width
        self.layers = nn.Sequential(*layers)
        self.head = DualHead(inputs, classes) if dual_head else nn.Linear(inputs, classes)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def teacher_model(width: int) -> ResNet:
    """ResNet-18 (width 64: 11.2M parameters)."""
    return ResNet((width, 2 * width, 4 * width, 8 * width), blocks=2)


def student_model(dual_head: bool) -> ResNet:
    """ResNet-8 (widths 16/32/64, one block per stage: 78k parameters)."""
    return ResNet((16, 32, 64), blocks=1, dual_head=dual_head)


# --- objectives ----------------------------------------------------------------------------


def ce_kd(output: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    return 0.1 * F.cross_entropy(output.float(), labels) + 0.9 * forward_kl(output, teacher, temperature=4.0)


def ce_pld(output: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(output.float(), labels) + pld(output, teacher, labels=labels)


def ce_dhkd(output: tuple[Tensor, Tensor], teacher: Tensor, labels: Tensor) -> Tensor:
    main, aux = output
    return F.cross_entropy(main.float(), labels) + dhkd(aux, teacher, temperature=2.0)


# name: (what the table calls it, objective, whether the student has DHKD's dual head)
STUDENTS: dict[str, tuple[str, Objective, bool]] = {
    "ce": ("CE", ce, False),
    "kd": ("0.1 CE + 0.9 KD (forward KL, T=4)", ce_kd, False),
    "pld": ("CE + PLD (T=1)", ce_pld, False),
    "dhkd": ("CE + DHKD (BinaryKL-Norm, T=2, aux head)", ce_dhkd, True),
}


def build(factory: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return factory().to(device, memory_format=torch.channels_last)


# --- report --------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| model | objective | params | epochs | test top-1 (%) | wall (s) | peak GPU mem (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        memory = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f}"
        lines.append(
            f"| {row['model']} | {row['objective']} | {row['params']:,} | {row['epochs']} | "
            f"{row['top1']:.2f} | {row['seconds']:.1f} | {memory} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every training run")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    parser.add_argument("--teacher-width", type=int, default=64, help="ResNet-18's first width (standard: 64)")
    parser.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated, of {', '.join(STUDENTS)}")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N (shuffled) train and test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    unknown = sorted(set(args.students.split(",")) - set(STUDENTS))
    if unknown:
        parser.error(f"unknown student objective {unknown[0]!r} (choose from {', '.join(STUDENTS)})")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    train_set, test_set = (
        tuple(t.to(device) for t in subset(load_split(args.data, args.cache, split), args.limit, args.seed))
        for split in ("train", "test")
    )
    data_seconds = time.perf_counter() - started
    rows = []

    def run(name: str, description: str, model: nn.Module, objective: Objective, teacher: nn.Module | None) -> None:
        seconds, peak = measured(lambda: train(model, objective, teacher, train_set, args, device), device)
        rows.append(
            {
                "model": "teacher ResNet-18" if name == "teacher" else "student ResNet-8",
                "objective": description,
                "name": name,
                "params": sum(p.numel() for p in model.parameters()),
                "epochs": args.epochs,
                "top1": accuracy(model, *test_set, device),
                "seconds": seconds,
                "peak_gpu_gib": peak,
            }
        )
        print(f"{name}: top-1 {rows[-1]['top1']:.2f}% in {seconds:.1f} s", flush=True)

    teacher = build(lambda: teacher_model(args.teacher_width), args.seed, device)
    run("teacher", "CE", teacher, ce, None)
    teacher.eval().requires_grad_(False)
    for name in args.students.split(","):
        description, objective, dual_head = STUDENTS[name]
        student = build(lambda dual_head=dual_head: student_model(dual_head), args.seed + 1, device)
        run(name, description, student, objective, None if name == "ce" else teacher)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "train_images": len(train_set[0]),
        "test_images": len(test_set[0]),
        "data_seconds": data_seconds,
        "total_seconds": time.perf_counter() - started,
        "args": {key: str(value) for key, value in vars(args).items()},
        "runs": rows,
    }
    print()
    print(table(rows))
    print(
        f"\n{result['device']}, {result['train_images']} training / {result['test_images']} test images, "
        f"data {data_seconds:.1f} s, total {result['total_seconds']:.1f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_distill_cifar.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
