"""EQ-Net's genetic search against RCO on the same supernet at the same average weight bits.

Needs what ``python -m scripts.bench_eqnet`` leaves in ``--work`` (the full-precision model and
the split zips; ``--static-only`` is enough). Two recipes train the same supernet from it (same
seed and data, so the same supernet), then allocate at ``--bits`` average weight bits:

- ``eqnet_search``: predictor and genetic search (weights and inputs both in (b - 0.5, b]),
  tensor-wise symmetric weights, asymmetric inputs (bench_eqnet's condition);
- ``rco`` over the supernet's candidates (``providers: [eqnet]``, tensor-wise symmetric weights
  2..8 bits), budget ``bits_per_weight: b`` over every quantized layer (stem and classifier at
  their fixed 8 bits count too, so it is slightly tighter), KL to the full-precision model.

Both written checkpoints are scored by the ``accuracy`` metric on the test images (weights as
allocated, inputs in full precision, as the checkpoints hold them; rco scored its candidates
with 8-bit inputs, eqnet's default ``input_bits``); eqnet_search's own measurement with its
inputs quantized and batch norms re-estimated is reported beside it. Prints and writes
``compare_eqnet_rco.json`` to ``--out``.

Usage::

    python -m scripts.bench_eqnet --smoke --static-only --work W --out O
    python -m scripts.compare_eqnet_rco --smoke --work W --out O
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import torch

from scripts.bench_eqnet import data_entries, percent, run_recipe, search, training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_eqnet's --work")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/cifar10")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--holdout", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--bn-batches", type=int, default=2)
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--predictor-samples", type=int, default=250)
    parser.add_argument("--predictor-epochs", type=int, default=100)
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--rco-steps", type=int, default=300)
    parser.add_argument("--limit", type=int, default=None, help="train on only N images")
    parser.add_argument("--smoke", action="store_true", help="bench_eqnet's --smoke sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.holdout, args.calibration = 1, 32, 4, 32
        args.test_samples, args.predictor_samples, args.predictor_epochs, args.generations = 40, 12, 2, 3
        args.limit, args.bn_batches, args.rco_steps = args.limit or 128, 1, 30
    return args


def main() -> None:
    args = parse_args()
    train_zip, holdout_zip = args.work / "data" / "train.zip", args.work / "data" / "holdout.zip"
    train_images = len(zipfile.ZipFile(train_zip).namelist())
    train_images = min(train_images, args.limit) if args.limit else train_images
    steps = args.epochs * (train_images // args.batch_size)
    model_dir = args.work / "models" / "resnet20"
    data = data_entries(args, train_zip, holdout_zip, train_images)
    evaluate = {"evaluate": [{"metric": "accuracy", "data": "test"}]}
    rco = {
        "method": "rco",
        "targets": ["Conv2d", "Linear"],
        "providers": ["eqnet"],
        "settings": {"bits": list(range(2, 9))},
        "budget": {"bits_per_weight": args.bits},
        "steps": args.rco_steps,
        "batch_size": min(64, args.calibration),
    }
    genetic = run_recipe(
        args, "compare-ga", model_dir, data, [training(args, steps), search(args, average_bits=args.bits)], **evaluate
    )
    allocated = run_recipe(args, "compare-rco", model_dir, data, [training(args, steps), rco], **evaluate)
    ga_stage, rco_stage = genetic["stages"][1], allocated["stages"][1]
    result = {
        "bits": args.bits,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "eqnet_search": {
            "top1_weights_only": genetic["evaluation"],
            "measured_w_and_a": percent(ga_stage["details"]["measured"]),
            "average_bits": ga_stage["details"]["average_bits"],
            "predictor_seconds": ga_stage["details"]["predictor"]["seconds"],
            "search_seconds": ga_stage["details"]["search"]["seconds"],
        },
        "rco": {
            "top1_weights_only": allocated["evaluation"],
            "achieved": rco_stage["details"]["achieved"],
            "search_seconds": rco_stage["details"]["search_seconds"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_eqnet_rco.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
