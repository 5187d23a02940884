"""A DeiT-Tiny-like ViT trained on CIFAR-10, saved as a Hugging Face checkpoint (GPU, minutes).

``ViTForImageClassification`` (transformers' ViT classes) with DeiT-Tiny's width, depth and
heads (192, 12 layers of 3 heads, MLP 768; 5.4 M parameters) on 32x32 images in patches of
4 (64 tokens and a class token), trained from scratch on the 25,000 training images of
``--data`` with ``scripts.cifar``'s GPU pipeline (crop-and-flip augmentation on the device,
AdamW at peak lr 1e-3 and weight decay 0.05, one warm-up epoch then cosine, bf16 autocast,
batch 512, 60 epochs by default), saved to ``--models``/vit-deit-tiny with a ``ViTImageProcessor`` (rescale, CIFAR
mean and std, no resize) so that ``compress`` recipes load it with the ``images`` data.
Writes ``train_vit_cifar.json`` (epochs, seconds, peak memory, test top-1) to ``--out``.

Usage::

    python -m scripts.train_vit_cifar --out OUT --models /tmp/models          # H100: about 3 min
    python -m scripts.train_vit_cifar --smoke --out /tmp/x --models /tmp/x    # CPU check
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

from scripts.cifar import accuracy, add_data_arguments, ce, load_split, measured, subset, train
from scripts.train_cifar import Logits, save, vit

NAME = "vit-deit-tiny"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--models", type=Path, default=None, help="where the checkpoint goes (default: OUT/models)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="two layers, one epoch on 512 images (CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size = 1, 64
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    limit = 512 if args.smoke else None
    train_set = tuple(t.to(device) for t in subset(load_split(args.data, args.cache, "train"), limit, args.seed))
    test_set = tuple(t.to(device) for t in subset(load_split(args.data, args.cache, "test"), limit, args.seed))
    torch.manual_seed(args.seed)
    model = vit(args.smoke, depth=12).to(device)  # DeiT-Tiny's width, depth and heads
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    run_args = argparse.Namespace(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    seconds, peak = measured(partial(train, Logits(model), ce, None, train_set, run_args, device, optimizer), device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs,
        "train_images": len(train_set[0]),
        "train_seconds": seconds,
        "peak_gpu_gib": peak,
        "test_top1_bf16": accuracy(Logits(model), *test_set, device),
    }
    directory = (args.models or args.out / "models") / NAME
    save(model.eval().cpu(), directory)
    result["checkpoint"] = str(directory)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_vit_cifar.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
