"""SR-STE against plain STE on CIFAR-10: N:M sparse ResNet-18 trained from scratch (GPU).

The setting of Zhou et al. (ICLR 2021) at CIFAR scale: a ResNet-18 (CIFAR variant,
``scripts.bench_distill_cifar.teacher_model``) is trained from scratch on the 25,000
training images of ``--data`` three ways per pattern, from the same initialization, data
order and number of epochs: dense; N:M sparse with plain STE (the mask recomputed from
the dense weights at every forward, the gradient passed straight through: ``lambda_w`` 0);
N:M sparse with SR-STE (the same plus ``λ_w (1 − mask) ⊙ W`` on the pruned weights'
gradient, λ_w 2e-4 as the official code). Every convolution whose input channels divide
by M is sparse, grouped along the input channels (NHWC order, the official
``Sparse_NHWC``): all but the 3-channel stem; the linear head stays dense. The estimator
is ``compress_nm.srste``, the one ``srste`` stages use.

Reported per run: top-1 on the 10,000 test images (the masks baked in; the baked weights
verified N:M), wall time, and the sparse architecture divergence (SAD: the fraction of
mask entries that differ) between consecutive epochs and from the first epoch to the
last. The paper reports that SR-STE lowers SAD and raises accuracy; the gap grows with
sparsity, hence the default patterns 2:4 and 1:4. Training as ``scripts.cifar.train``: SGD
(Nesterov 0.9, weight decay 5e-4), one warm-up epoch then cosine, bf16 autocast, channels-last.

Usage::

    python -m scripts.bench_srste_cifar --out OUT                                   # H100: about 4 minutes
    python -m scripts.bench_srste_cifar --epochs 1 --limit 256 --width 8 --out /tmp/x  # CPU logic check
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch import Tensor, nn

from compress_nm.patterns import NMPattern, is_nm_sparse
from compress_nm.srste import attach, bake, dense_weight, nm_mask, sparse_architecture_divergence
from scripts.bench_distill_cifar import build, teacher_model
from scripts.cifar import accuracy, add_data_arguments, ce, load_split, measured, subset, train


def sparse_convolutions(model: nn.Module, pattern: NMPattern) -> dict[str, nn.Conv2d]:
    """The convolutions N:M can apply to: input channels divisible by M."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.in_channels % pattern.m == 0
    }


class EpochMasks:
    """An objective that records every layer's mask at the start of each epoch (by counting steps)."""

    def __init__(self, layers: dict[str, nn.Conv2d], pattern: NMPattern, steps_per_epoch: int) -> None:
        self.layers, self.pattern, self.steps_per_epoch = layers, pattern, steps_per_epoch
        self.step = 0
        self.epochs: list[dict[str, Tensor]] = []

    def masks(self) -> dict[str, Tensor]:
        return {name: nm_mask(dense_weight(module), self.pattern) for name, module in self.layers.items()}

    def __call__(self, output: Tensor, teacher: Tensor | None, labels: Tensor) -> Tensor:
        if self.step % self.steps_per_epoch == 0:
            self.epochs.append(self.masks())
        self.step += 1
        return ce(output, teacher, labels)

    def divergence(self) -> dict[str, object]:
        """SAD between consecutive epochs (the last entry: last epoch's start to the end) and first to end."""
        snapshots = [*self.epochs, self.masks()]
        per_epoch = [sparse_architecture_divergence(b, a) for a, b in itertools.pairwise(snapshots)]
        return {"sad_per_epoch": per_epoch, "sad_total": sparse_architecture_divergence(snapshots[-1], snapshots[0])}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18's first width (standard: 64)")
    parser.add_argument("--patterns", default="2:4,1:4", help="comma-separated N:M patterns")
    parser.add_argument("--lambda-w", type=float, default=2e-4, help="SR-STE's λ_w")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N (shuffled) train and test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    train_set, test_set = (
        tuple(t.to(device) for t in subset(load_split(args.data, args.cache, split), args.limit, args.seed))
        for split in ("train", "test")
    )
    steps_per_epoch = max(len(train_set[0]) // args.batch_size, 1)
    rows = []

    def run(pattern: NMPattern | None, lambda_w: float | None) -> None:
        model = build(lambda: teacher_model(args.width), args.seed, device)
        layers = {} if pattern is None else sparse_convolutions(model, pattern)
        for module in layers.values():
            attach(module, pattern, lambda_w)
        objective = EpochMasks(layers, pattern, steps_per_epoch) if pattern is not None else ce
        seconds, peak = measured(lambda: train(model, objective, None, train_set, args, device), device)
        row = {
            "pattern": "dense" if pattern is None else str(pattern),
            "estimator": "-" if pattern is None else ("STE" if lambda_w == 0 else f"SR-STE (λ_w {lambda_w:g})"),
            "sparse_layers": len(layers),
            "epochs": args.epochs,
            "seconds": seconds,
            "peak_gpu_gib": peak,
        }
        if pattern is not None:
            row.update(objective.divergence())
            for module in layers.values():
                bake(module)
            row["baked_n_m"] = all(
                is_nm_sparse(m.weight.detach().permute(0, 2, 3, 1).reshape(-1, m.in_channels), pattern)
                for m in layers.values()
            )
        row["top1"] = accuracy(model, *test_set, device)
        rows.append(row)
        sad = f", SAD first to last {row['sad_total']:.4f}" if pattern is not None else ""
        print(f"{row['pattern']} {row['estimator']}: top-1 {row['top1']:.2f}% in {seconds:.1f} s{sad}", flush=True)

    run(None, None)
    for text in args.patterns.split(","):
        pattern = NMPattern.parse(text)
        run(pattern, 0.0)
        run(pattern, args.lambda_w)

    print("\n| pattern | estimator | test top-1 (%) | SAD first→last | SAD last epoch | wall (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        sad = f"{row['sad_total']:.4f} | {row['sad_per_epoch'][-1]:.5f}" if "sad_total" in row else "- | -"
        print(f"| {row['pattern']} | {row['estimator']} | {row['top1']:.2f} | {sad} | {row['seconds']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": {
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "lr", "width", "patterns", "lambda_w", "limit", "seed")
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "script_seconds": time.perf_counter() - started,
        "runs": rows,
    }
    (args.out / "bench_srste_cifar.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
