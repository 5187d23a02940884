"""CIFAR-10 image classifiers quantized by ``compress``: a small ViT and a small ResNet (GPU).

Trains a Hugging Face ViT (patches of 4 on 32x32 images) and a Hugging Face ResNet (basic
blocks) on the 25,000 training images of ``--data`` (``cifar10-train25k.zip``), saves each
as a Hugging Face folder with a ``ViTImageProcessor`` (rescale, CIFAR mean and standard
deviation, no resize), then runs one ``compress apply`` recipe per method and width:
``rtn`` and ``gptq`` at W8 (one scale per output channel) and W4 (groups of 32), dense
output, gptq calibrated on ``--calibration`` training images, every recipe evaluated on the
10,000 test images (``cifar10-test.zip``) with the ``accuracy``, ``agreement`` and
``class_kl`` metrics. The targets are the layers inside the repeated blocks (the ViT's
Linear layers, the ResNet stages' convolutions); patch embedding, stem and classifier stay
in full precision. Each written checkpoint is loaded back with ``from_pretrained`` and its
logits compared with the in-memory compressed model's (the dense round trip).

Training uses ``scripts.cifar``'s GPU pipeline (images decoded once with Pillow,
augmented on the device, warm-up then cosine, bf16 autocast): AdamW for the ViT, SGD for the
ResNet. Prints a markdown table and writes ``train_cifar.json`` to ``--out``
(after every run, so a cut-off run keeps what it measured); checkpoints and recipes go
to ``--models``.

Usage::

    python -m scripts.train_cifar --data .data/cifar10 --out OUT                  # H100: minutes
    python -m scripts.train_cifar --epochs 1 --limit 512 --test-samples 200 \\
        --calibration 20 --tiny --out /tmp/x                                      # CPU check
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from scripts.cifar import (
    MEAN,
    SPLITS,
    STD,
    accuracy,
    add_data_arguments,
    ce,
    load_split,
    measured,
    subset,
    train,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SETTINGS = {"W8": {"bits": 8, "group_size": None}, "W4": {"bits": 4, "group_size": 32}}
"""W8: one scale per output channel; W4: one per 32 input columns. Symmetric in both."""
TARGETS = {
    "vit": {"targets": ["Linear"], "ignore": ["classifier"]},
    "resnet": {"targets": ["re:resnet\\.encoder\\..*convolution$"]},
}


class Logits(nn.Module):
    """A Hugging Face image classifier as ``pixel_values -> logits`` (what the training loop calls)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits


def labels() -> dict:
    return {"id2label": dict(enumerate(CLASSES)), "label2id": {name: i for i, name in enumerate(CLASSES)}}


def vit(tiny: bool, depth: int = 6) -> nn.Module:
    """ViT, patches of 4 (64 tokens), width 192, ``depth`` layers of 3 heads, MLP 768: 2.7M parameters
    at depth 6 (12 is DeiT-Tiny's shape: 5.4M); two layers of width 32 when ``tiny``."""
    from transformers import ViTConfig, ViTForImageClassification

    width, layers, heads = (32, 2, 2) if tiny else (192, depth, 3)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **labels(),
    )
    return ViTForImageClassification(config)


def resnet(tiny: bool) -> nn.Module:
    """ResNet of basic blocks, two per stage, widths 32/64/128/256 (Hugging Face's 7x7 stem): 2.8M parameters."""
    from transformers import ResNetConfig, ResNetForImageClassification

    widths = [32, 64] if tiny else [32, 64, 128, 256]
    config = ResNetConfig(
        embedding_size=widths[0], hidden_sizes=widths, depths=[2] * len(widths), layer_type="basic", **labels()
    )
    return ResNetForImageClassification(config)


def optimizer_for(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    """AdamW for the ViT; None (the training loop's SGD) for the ResNet."""
    if name == "vit":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return None


def save(model: nn.Module, directory: Path) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(directory)
    processor = ViTImageProcessor(
        do_resize=False,
        size={"height": 32, "width": 32},
        image_mean=MEAN.flatten().tolist(),
        image_std=STD.flatten().tolist(),
    )
    processor.save_pretrained(directory)


def recipe(args: argparse.Namespace, model_dir: Path, name: str, method: str, setting: str, out: Path) -> dict:
    return {
        "model": str(model_dir),
        "data": {
            "calibration": {"path": str(args.data / SPLITS["train"]), "source": "images", "samples": args.calibration},
            "evaluation": {"path": str(args.data / SPLITS["test"]), "source": "images", "samples": args.test_samples},
        },
        "stages": [{"method": method, **SETTINGS[setting], **TARGETS[name]}],
        "output": {"dir": str(out), "format": "dense"},
        "evaluate": ["accuracy", "agreement", "class_kl"],
        "run": {"mode": "whole", "device": args.device},
    }


def compress_run(path: Path) -> tuple[Any, float]:
    """``compress apply --overwrite`` of the recipe at ``path``, in this process: the run's context and seconds."""
    from compress.engine import apply_recipe
    from compress.host import get_host
    from compress.validate import check_recipe

    host = get_host()
    started = time.perf_counter()
    context = apply_recipe(host, check_recipe(host, path, overwrite=True), overwrite=True)
    return context, time.perf_counter() - started


@torch.no_grad()
def round_trip_difference(directory: Path, context: Any, device: torch.device, images: int = 256) -> float:
    """Largest |logit difference| between the checkpoint written to ``directory``, loaded with
    ``from_pretrained``, and the run's in-memory compressed model, on the first evaluation images."""
    from transformers import AutoModelForImageClassification

    written = AutoModelForImageClassification.from_pretrained(directory).to(device).eval()
    compressed = context.model.to(device).eval()
    pixels = torch.stack([sample["pixel_values"] for sample in context.data("evaluation")[:images]]).to(device)
    return (written(pixel_values=pixels).logits - compressed(pixel_values=pixels).logits).abs().max().item()


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | FP top-1 (%) | method | weights | top-1 (%) | agreement (%) | KL to FP (nats) | apply (s) "
        + "| reloaded: max abs logit diff |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params']:,} | {row['fp_top1']:.2f} | {row['method']} | {row['setting']} | "
            f"{row['top1']:.2f} | {row['agreement']:.2f} | {row['kl']:.2e} | {row['seconds']:.1f} | "
            f"{row['round_trip']:.1e} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--models", type=Path, default=None, help="where checkpoints go (default: OUT/models)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of both models (default: ViT 40, ResNet 30)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="train on only the first N (shuffled) images")
    parser.add_argument("--calibration", type=int, default=512, help="gptq calibration images (training set)")
    parser.add_argument("--test-samples", type=int, default=10000, help="test images every recipe evaluates")
    parser.add_argument("--tiny", action="store_true", help="two-layer models (CPU check of the script)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


# name: (model factory, epochs, peak learning rate)
MODELS = {"vit": (vit, 40, 1e-3), "resnet": (resnet, 30, 0.2)}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    models_dir = args.models or args.out / "models"
    started = time.perf_counter()
    train_set = tuple(t.to(device) for t in subset(load_split(args.data, args.cache, "train"), args.limit, args.seed))
    test_set = tuple(t.to(device) for t in load_split(args.data, args.cache, "test"))
    rows, trained = [], {}
    for name, (factory, epochs, lr) in MODELS.items():
        torch.manual_seed(args.seed)
        model = factory(args.tiny).to(device)
        run_args = argparse.Namespace(epochs=args.epochs or epochs, batch_size=args.batch_size, lr=lr, seed=args.seed)
        optimizer = optimizer_for(name, model, lr)
        seconds, peak = measured(
            partial(train, Logits(model), ce, None, train_set, run_args, device, optimizer), device
        )
        trained[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "epochs": run_args.epochs,
            "train_seconds": seconds,
            "peak_gpu_gib": peak,
            "test_top1_bf16": accuracy(Logits(model), *test_set, device),
        }
        print(f"{name}: {trained[name]}", flush=True)
        save(model.eval().cpu(), models_dir / name)

    for name in MODELS:
        for method in ("rtn", "gptq"):
            for setting in SETTINGS:
                out = models_dir / f"{name}-{method}-{setting.lower()}"
                path = models_dir / "recipes" / f"{name}-{method}-{setting.lower()}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                raw = recipe(args, models_dir / name, name, method, setting, out)
                path.write_text(yaml.safe_dump(raw))
                context, seconds = compress_run(path)
                evaluation = context.report.evaluation
                rows.append(
                    {
                        "model": name,
                        "params": trained[name]["params"],
                        "method": method,
                        "setting": setting,
                        "fp_top1": 100 * evaluation["accuracy"]["original"],
                        "top1": 100 * evaluation["accuracy"]["compressed"],
                        "round_trip": round_trip_difference(out, context, device),
                        "agreement": 100 * evaluation["agreement"]["compressed"],
                        "kl": evaluation["class_kl"]["compressed"],
                        "seconds": seconds,
                        "evaluation": evaluation,
                        "recipe": raw,
                    }
                )
                print(f"{name} {method} {setting}: top-1 {rows[-1]['top1']:.2f}%", flush=True)
                result = write_result(args, trained, rows, started, len(train_set[0]))
    print()
    print(table(rows))
    print(
        f"\n{result['device']}, torch {result['torch']}, transformers {result['transformers']}, "
        f"{result['train_images']} training images, total {result['total_seconds']:.1f} s"
    )


def write_result(args: argparse.Namespace, trained: dict, rows: list[dict], started: float, train_images: int) -> dict:
    """Everything measured so far, as ``train_cifar.json`` in ``--out`` (rewritten after each run)."""
    import transformers

    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "train_images": train_images,
        "total_seconds": time.perf_counter() - started,
        "args": {key: str(value) for key, value in vars(args).items()},
        "trained": trained,
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_cifar.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
