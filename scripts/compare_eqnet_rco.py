"""EQ-Net's genetic search against RCO and EvoPress on one supernet at equal BitOps.

Needs what ``python -m scripts.bench_eqnet`` leaves in ``--work`` (the full-precision model and
the split zips; ``--fp-only`` is enough). One recipe trains the supernet once, then
allocates under the same budget, ``--bits``: the BitOps per image of the uniform sub-network
W{bits}A{bits} (first and last layer at their fixed 8 bits), every search over weight *and*
input bits 2..8, tensor-wise symmetric weights, asymmetric inputs (bench_eqnet's condition):

1. ``rco`` and ``evopress`` over the supernet's candidates (``providers: [eqnet]``, KL to the
   full-precision model on the calibration images, inputs quantized as each candidate says),
   right after the ``eqnet`` stage, on the trained supernet's batch-norm statistics;
2. ``eqnet_search`` with ``bitops``: accuracy predictor on the holdout images, genetic search;
3. ``eqnet_search`` with ``configuration: rco`` and ``configuration: evopress``: each chosen
   configuration measured exactly as the genetic search measures its pick (weights and inputs
   quantized by the supernet's learned LSQ+ quantizers, batch norms re-estimated on the same
   calibration batches, top-1 on the same test images).

The last stage's output (EvoPress's configuration, format dense, inputs listed as activation
points) is also scored by the recipe's ``accuracy`` evaluation, which applies those points: it
must equal that stage's own measurement. Prints progress and writes ``compare_eqnet_rco.json``
to ``--out``.

Usage::

    python -m scripts.bench_eqnet --smoke --fp-only --work W --out O   # CPU, seconds
    python -m scripts.compare_eqnet_rco --smoke --work W --out O           # CPU, about 1 minute
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path

import torch
from compress_eqnet.efficiency import Efficiency, layer_costs
from torch import nn
from transformers import AutoModelForImageClassification

from scripts.bench_eqnet import data_entries, percent, run_recipe, search, training

FIXED_BITS = 8
SEARCHES = ("ga", "rco", "evopress")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="bench_eqnet's --work")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/cifar10")
    parser.add_argument("--bits", type=int, default=3, help="budget: the BitOps of uniform W{bits}A{bits}")
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
    parser.add_argument("--evopress-generations", type=int, default=150, help="the official default")
    parser.add_argument("--evopress-seconds", type=float, default=150.0, help="evopress's time_limit")
    parser.add_argument("--limit", type=int, default=None, help="train on only N images")
    parser.add_argument("--smoke", action="store_true", help="bench_eqnet's --smoke sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.batch_size, args.holdout, args.calibration = 1, 32, 4, 32
        args.test_samples, args.predictor_samples, args.predictor_epochs, args.generations = 40, 12, 2, 3
        args.limit, args.bn_batches, args.rco_steps, args.evopress_generations = args.limit or 128, 1, 10, 3
    return args


def uniform_bitops(model_dir: Path, bits: int) -> float:
    """BitOps per image of W{bits}A{bits} over the model's Conv2d/Linear layers (first and last at
    8 bits), as eqnet and its candidates count them (:class:`compress_eqnet.efficiency.Efficiency`)."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    size = model.config.image_size if isinstance(getattr(model.config, "image_size", None), int) else 32
    costs = layer_costs(model, layers, torch.zeros(1, model.config.num_channels, size, size))
    return Efficiency(list(costs.values()), FIXED_BITS).bitops((bits,) * len(layers), (bits,) * len(layers))


def allocation(args: argparse.Namespace, method: str, bitops: float) -> dict:
    """``method`` (rco or evopress) over the supernet's weight and input bits under ``bitops``."""
    stage = {
        "name": method,
        "method": method,
        "targets": ["Conv2d", "Linear"],
        "providers": ["eqnet"],
        "settings": {"bits": list(range(2, 9)), "input_bits": list(range(2, 9))},
        "budget": {"bitops": bitops},
        "batch_size": min(64, args.calibration),
    }
    if method == "rco":
        return {**stage, "steps": args.rco_steps}
    # one forward pass scores an offspring on all calibration images (batch_size is speed only)
    evopress = {"generations": args.evopress_generations, "time_limit": args.evopress_seconds}
    evopress["batch_size"] = args.calibration
    if args.smoke:
        evopress |= {"offspring": 4, "survivors": [1], "tokens": [args.calibration], "initial": 4}
    return {**stage, **evopress}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    train_zip, holdout_zip = args.work / "data" / "train.zip", args.work / "data" / "holdout.zip"
    train_images = len(zipfile.ZipFile(train_zip).namelist())
    train_images = min(train_images, args.limit) if args.limit else train_images
    steps = args.epochs * (train_images // args.batch_size)
    model_dir = args.work / "models" / "resnet20"
    data = data_entries(args, train_zip, holdout_zip, train_images)
    bitops = uniform_bitops(model_dir, args.bits)
    print(f"budget: {bitops:.6g} BitOps per image (uniform W{args.bits}A{args.bits}); supernet {steps} steps")
    stages = [
        training(args, steps),
        allocation(args, "rco", bitops),
        allocation(args, "evopress", bitops),
        {**search(args, bitops=bitops, evaluate_uniform=[args.bits]), "name": "ga"},
        *({**search(args, configuration=method), "name": f"{method}-measured"} for method in SEARCHES[1:]),
    ]
    report = run_recipe(
        args, "compare-searches", model_dir, data, stages, evaluate=[{"metric": "accuracy", "data": "test"}]
    )
    by_name = {stage["name"]: stage for stage in report["stages"]}
    ga = by_name["ga"]["details"]
    rows = {"uniform": {"top1": percent(ga["uniform"][f"W{args.bits}A{args.bits}"])["test"], "bitops": bitops}}
    for method in SEARCHES:
        measured = by_name["ga" if method == "ga" else f"{method}-measured"]
        details = measured["details"]
        rows[method] = {
            "top1": 100 * details["measured"]["test"],
            "bitops": details["bitops"],
            "average_bits": details["average_bits"],
            "subnet": details["subnet"],
            "search_seconds": (
                ga["predictor"]["seconds"] + ga["search"]["seconds"]
                if method == "ga"
                else by_name[method]["details"]["search_seconds"]
            ),
        }
        if method != "ga":
            rows[method]["kl_achieved"] = by_name[method]["details"].get("achieved")
    rows["ga"]["predicted_top1"] = 100 * ga["predicted_accuracy"]
    rows["ga"]["predictor_kendall_tau"] = ga["predictor"].get("kendall_tau")
    result = {
        "budget_bitops": bitops,
        "bits": args.bits,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "epochs": args.epochs,
        "test_images": args.test_samples,
        "rows": rows,
        "written_output_evaluation": report["evaluation"],
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_eqnet_rco.json").write_text(json.dumps(result, indent=2))
    print("| search | top-1 (%) | BitOps | avg w bits | avg a bits | search (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        averages = row.get("average_bits", {"weights": args.bits, "inputs": args.bits})
        print(
            f"| {name} | {row['top1']:.2f} | {row['bitops']:.4g} | {averages['weights']:.3f} | "
            f"{averages['inputs']:.3f} | {row.get('search_seconds', 0.0):.1f} |"
        )
    print(json.dumps(result["written_output_evaluation"]))


if __name__ == "__main__":
    main()
