"""EQ-Net on CIFAR-10: one supernet against separately trained static counterparts (GPU).

1. Trains a full-precision ResNet-20-style Hugging Face ResNet (basic blocks, widths 16/32/64,
   three blocks per stage; Hugging Face's 7x7 stem) with ``scripts.cifar``'s pipeline on the
   training images, less ``--holdout`` per class kept apart for the accuracy predictor.
2. ``compress apply``: ``eqnet`` trains the supernet from it for ``--epochs``; two
   ``eqnet_search`` stages then search at 3 and 4 average bits (the first also measures the
   uniform W2A2, W3A3, W4A4, W8A8 sub-networks and trains the predictor, Kendall τ on a held-out
   fifth of the measured sub-networks; the second reuses it). Tensor-wise symmetric weights,
   asymmetric inputs: the reference code's search condition.
3. The static counterparts: for each uniform width, ``eqnet`` on a one-setting space with one
   sub-network per step (plain quantization-aware training) for the same ``--epochs`` from the
   same full-precision model, exported by ``eqnet_search`` with ``bits``.

Every sub-network is measured on the 10,000 test images with weights and inputs quantized,
after batch-norm recalibration on training images. The paper trains 120 epochs on ImageNet;
this run trains ``--epochs`` (default 10) to fit one GPU call. Writes ``bench_eqnet.json``
to ``--out`` after every part and prints a markdown table; zips, models and run outputs go
to ``--work``.

Usage::

    python -m scripts.bench_eqnet --out OUT                  # H100, about 7-8 minutes
    python -m scripts.bench_eqnet --smoke --out /tmp/x       # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from scripts.cifar import ROOT, SPLITS, add_data_arguments, ce, load_split, measured, subset, train
from scripts.train_cifar import Logits, compress_run, labels, save

UNIFORM = [2, 3, 4, 8]
STATIC_ORDER = [4, 8, 2, 3]
"""The static counterparts, those the paper's claim is about (4 bits and above) first."""
BUDGETS = [3.0, 4.0]
CONDITION = {"granularity": "tensor", "w_symmetric": True, "a_symmetric": False}


def resnet20(smoke: bool) -> torch.nn.Module:
    """Widths 16/32/64, three basic blocks per stage (smoke: 8/16, one block each)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    widths, depths = ([8, 16], [1, 1]) if smoke else ([16, 32, 64], [3, 3, 3])
    config = ResNetConfig(embedding_size=widths[0], hidden_sizes=widths, depths=depths, layer_type="basic", **labels())
    return ResNetForImageClassification(config)


def split_zip(source: Path, directory: Path, holdout: int) -> tuple[Path, Path]:
    """``source`` as two zips: the last ``holdout`` files of each class, and the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    kept, held = directory / "train.zip", directory / "holdout.zip"
    with zipfile.ZipFile(source) as archive:
        names = sorted(name for name in archive.namelist() if not name.endswith("/"))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(name.split("/")[0], []).append(name)
        with zipfile.ZipFile(kept, "w") as train_zip, zipfile.ZipFile(held, "w") as holdout_zip:
            for files in by_class.values():
                for index, name in enumerate(files):
                    target = holdout_zip if index >= len(files) - holdout else train_zip
                    target.writestr(name, archive.read(name))
    return kept, held


def data_entries(args: argparse.Namespace, train_zip: Path, holdout_zip: Path, train_images: int) -> dict:
    return {
        "train": {"path": str(train_zip), "source": "images", "samples": train_images},
        "calibration": {"path": str(train_zip), "source": "images", "samples": args.calibration},
        "holdout": {"path": str(holdout_zip), "source": "images", "samples": args.holdout * 10},
        "test": {"path": str(args.data / SPLITS["test"]), "source": "images", "samples": args.test_samples},
    }


def training(args: argparse.Namespace, steps: int, **space: Any) -> dict:
    """An ``eqnet`` stage of ``steps`` steps (the reference's Adam at 1e-3, cosine, clipping by value)."""
    return {
        "method": "eqnet",
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": 1e-3,
        "mixed_precision": "no",
        "log_every": max(1, steps // 10),
        "init_samples": args.calibration,
        **space,
    }


def search(args: argparse.Namespace, **target: Any) -> dict:
    return {
        "method": "eqnet_search",
        "test_data": "test",
        "bn_batches": args.bn_batches,
        "predictor_samples": args.predictor_samples,
        "predictor_epochs": args.predictor_epochs,
        "generations": args.generations,
        **CONDITION,
        **target,
    }


def run_recipe(
    args: argparse.Namespace, name: str, model_dir: Path, data: dict, stages: list[dict], **extra: Any
) -> dict:
    """``compress apply`` of one recipe (``extra``: more top-level keys, e.g. ``evaluate``); its report.json."""
    directory = args.work / "runs"
    directory.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": str(model_dir),
        "data": data,
        "stages": stages,
        "output": {"dir": str(directory / name), "format": "dense"},
        "run": {"device": args.device, "mode": "whole"},
        **extra,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    _, seconds = compress_run(path)
    report = json.loads((directory / name / "report.json").read_text())
    report["apply_seconds"] = seconds
    return report


def percent(measured_: dict) -> dict:
    return {key: 100 * value for key, value in measured_.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "eqnet", help="split zips, models, run outputs")
    parser.add_argument("--epochs", type=int, default=10, help="supernet epochs, and each static counterpart's")
    parser.add_argument("--fp-epochs", type=int, default=15, help="epochs of the full-precision model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--holdout", type=int, default=200, help="training images per class kept for the predictor")
    parser.add_argument("--calibration", type=int, default=512, help="training images for step-size init and BN")
    parser.add_argument("--bn-batches", type=int, default=2, help="calibration batches of 256 per BN re-estimate")
    parser.add_argument("--test-samples", type=int, default=10000)
    parser.add_argument("--predictor-samples", type=int, default=250)
    parser.add_argument("--predictor-epochs", type=int, default=100)
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="train on only N (shuffled) images")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU check of the script)")
    parser.add_argument(
        "--static-only", action="store_true", help="only the FP model and the static QAT runs (no supernet part)"
    )
    parser.add_argument(
        "--fp-only", action="store_true", help="only the FP model and the split zips (what compare_eqnet_rco needs)"
    )
    parser.add_argument(
        "--static-bits",
        type=lambda text: [int(bits) for bits in text.split(",")],
        default=STATIC_ORDER,
        help="the static counterparts' uniform widths, in order (default 4,8,2,3)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.fp_epochs, args.batch_size, args.holdout, args.calibration = 1, 1, 32, 4, 32
        args.test_samples, args.predictor_samples, args.predictor_epochs, args.generations = 40, 12, 2, 3
        args.limit, args.bn_batches = args.limit or 128, 1
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {"args": {key: str(value) for key, value in vars(args).items()}}

    def write() -> None:
        result["total_seconds"] = time.perf_counter() - started
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_eqnet.json").write_text(json.dumps(result, indent=2))

    train_zip, holdout_zip = split_zip(args.data / SPLITS["train"], args.work / "data", args.holdout)
    train_images = len(zipfile.ZipFile(train_zip).namelist())
    if args.limit:
        train_images = min(train_images, args.limit)
    steps = args.epochs * (train_images // args.batch_size)

    # 1. the full-precision model, on the same training images (the scripts.cifar pipeline)
    split = load_split(args.data, args.cache, "train")
    keep = holdout_mask(split[1], args.holdout)
    train_set = tuple(t.to(device) for t in subset((split[0][keep], split[1][keep]), args.limit, args.seed))
    torch.manual_seed(args.seed)
    model = resnet20(args.smoke).to(device)
    run_args = argparse.Namespace(epochs=args.fp_epochs, batch_size=args.batch_size, lr=0.2, seed=args.seed)
    seconds, _ = measured(partial(train, Logits(model), ce, None, train_set, run_args, device, None), device)
    model_dir = args.work / "models" / "resnet20"
    save(model.eval().cpu(), model_dir)
    result["fp"] = {
        "epochs": args.fp_epochs,
        "train_seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
    }
    write()
    if args.fp_only:
        return

    data = data_entries(args, train_zip, holdout_zip, train_images)
    if not args.static_only:
        run_supernet(args, result, model_dir, data, steps)
        write()

    # 3. the static counterparts: the same epochs at one setting
    result["static"] = {}
    for bits in args.static_bits:
        space = {"w_bits": [bits], "a_bits": [bits], "granularity": [CONDITION["granularity"]], "subnets": 1}
        space |= {"w_symmetric": [CONDITION["w_symmetric"]], "a_symmetric": [CONDITION["a_symmetric"]]}
        report = run_recipe(
            args, f"static-w{bits}a{bits}", model_dir, data, [training(args, steps, **space), search(args, bits=bits)]
        )
        result["static"][f"W{bits}A{bits}"] = {
            "seconds": report["stages"][0]["seconds"],
            "measured": percent(report["stages"][1]["details"]["measured"]),
        }
        print(f"static W{bits}A{bits}: {result['static'][f'W{bits}A{bits}']}", flush=True)
        write()
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write()
    print(json.dumps(result["static"], indent=2) if args.static_only else table(result))


def run_supernet(args: argparse.Namespace, result: dict, model_dir: Path, data: dict, steps: int) -> None:
    """The supernet, the uniform sub-networks, the predictor and the searches, into ``result["supernet"]``."""
    stages = [
        training(args, steps),
        search(args, average_bits=BUDGETS[0], evaluate_uniform=UNIFORM),
        search(args, average_bits=BUDGETS[1]),
    ]
    report = run_recipe(args, "supernet", model_dir, data, stages)
    trained, *searches = report["stages"]
    result["supernet"] = {
        "steps": steps,
        "seconds": trained["seconds"],
        "uniform": {key: percent(value) for key, value in searches[0]["details"]["uniform"].items()},
        "predictor": searches[0]["details"]["predictor"],
        "searched": [
            {
                "average_bits_budget": budget,
                "average_bits": stage["details"]["average_bits"],
                "bitops": stage["details"]["bitops"],
                "predicted_holdout": 100 * stage["details"]["predicted_accuracy"],
                "measured": percent(stage["details"]["measured"]),
                "search_seconds": stage["details"]["search"]["seconds"],
                "subnet": stage["details"]["subnet"],
            }
            for budget, stage in zip(BUDGETS, searches)
        ],
    }


def holdout_mask(labels_: torch.Tensor, holdout: int) -> torch.Tensor:
    """False for the last ``holdout`` images of each class (the zip is sorted by class then name)."""
    keep = torch.ones(len(labels_), dtype=torch.bool)
    for label in labels_.unique():
        where = (labels_ == label).nonzero().flatten()
        keep[where[len(where) - holdout :]] = False
    return keep


def table(result: dict) -> str:
    lines = ["| sub-network | supernet top-1 (%) | static QAT top-1 (%) |", "| --- | ---: | ---: |"]
    for name, measured_ in result["supernet"]["uniform"].items():
        static = result["static"].get(name, {}).get("measured", {}).get("test", float("nan"))
        lines.append(f"| {name} | {measured_['test']:.2f} | {static:.2f} |")
    for searched in result["supernet"]["searched"]:
        bits = searched["average_bits"]
        lines.append(
            f"| searched ≤{searched['average_bits_budget']:g} bits (W {bits['weights']:.2f}, A {bits['inputs']:.2f}) "
            f"| {searched['measured']['test']:.2f} | - |"
        )
    predictor = result["supernet"]["predictor"]
    lines.append(f"\nKendall τ {predictor['kendall_tau']:.3f} on {predictor['test_subnets']} held-out sub-networks")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
