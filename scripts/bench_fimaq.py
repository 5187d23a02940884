"""FIMA-Q on the CIFAR-10 ViT: full precision, rtn, searched ranges without reconstruction, and
reconstruction with each loss (mse, diag, lowrank, dplr), at W4A4 and W3A3 (GPU).

Each row is one ``compress apply`` recipe (in this process) with one ``fimaq`` stage on the
checkpoint ``scripts.train_vit_cifar`` wrote, calibrated on the same ``--calibration``
training images (a balanced subset of ``cifar10-train25k.zip``, read by the ``images`` data
source), targets every Linear and the patch embedding's convolution (classifier included),
``run.mode: whole``, no output. Rows:

- ``rtn``: min-max activation ranges per tensor, round-to-nearest weights on min-max grids,
  no reconstruction (``range_search: false, reconstruct: false``, no per-channel or per-token scales);
- ``init``: FIMA-Q's initialization alone (percentile-searched ranges, per-channel
  post-LayerNorm ranges folded into the LayerNorm then per-token scales (``--no-reparameterize``:
  left per channel), weight grids searched on the layer's output error as FIMA-Q's code does),
  no reconstruction;
- ``mse``, ``diag``, ``lowrank``, ``dplr``: the reconstruction with that loss (the patch
  embedding first, with the same loss; the classifier last, with KL).

Top-1 is measured here on the 10,000 test images (decoded once by ``scripts.cifar``), in
float32, on the in-memory model computing through the recorded activation points
(``compress.activation_points.quantized_points``, what ``compress apply``'s evaluation
does). Per row: seconds of the stage, seconds per block (from the stage's report), peak
GPU memory. Rows are appended to ``bench_fimaq.json`` in ``--out`` as they finish.

Usage::

    python -m scripts.bench_fimaq --model /tmp/models/vit-deit-tiny --out OUT      # H100
    python -m scripts.bench_fimaq --smoke --model /tmp/x/vit-deit-tiny --out /tmp/x  # CPU check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from scripts.cifar import SPLITS, add_data_arguments, load_split, normalize, subset
from scripts.train_cifar import compress_run

ROWS = {
    "rtn": {"range_search": False, "reconstruct": False, "channel_inputs": False, "token_scales": False},
    "init": {"reconstruct": False},
    "mse": {"loss": "mse"},
    "diag": {"loss": "diag"},
    "lowrank": {"loss": "lowrank"},
    "dplr": {"loss": "dplr"},
}
SETTINGS = {"W4A4": (4, 4), "W3A3": (3, 3)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint of scripts.train_vit_cifar")
    parser.add_argument("--calibration", type=int, default=512, help="calibration images (the paper: 1024)")
    parser.add_argument("--iterations", type=int, default=250, help="iterations per block (the paper: 20,000)")
    parser.add_argument("--rank", type=int, default=5, help="Fisher refreshes per block (k)")
    parser.add_argument("--test-samples", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--settings", default="W4A4,W3A3")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument(
        "--no-reparameterize",
        action="store_true",
        help="keep post-LayerNorm inputs per channel, unfolded (reparameterize_layernorm: false)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.smoke:
        args.calibration, args.iterations, args.rank, args.test_samples = 16, 4, 2, 64
    return args


def stage(args: argparse.Namespace, setting: str, row: str) -> dict:
    bits, activation_bits = SETTINGS[setting]
    fields = {"method": "fimaq", "bits": bits, "activation_bits": activation_bits, "targets": ["Linear", "Conv2d"]}
    fields.update({"iterations": args.iterations, "rank": args.rank, **ROWS[row]})
    if args.no_reparameterize:
        fields["reparameterize_layernorm"] = False
    if args.smoke:
        fields.update({"batch_size": 8, "search_steps": 8, "search_samples": 16})
    return fields


def recipe(args: argparse.Namespace, fields: dict) -> dict:
    calibration = {"path": str(args.data / SPLITS["train"]), "source": "images", "samples": args.calibration}
    return {
        "model": str(args.model),
        "data": {"calibration": calibration},
        "stages": [fields],
        "run": {"mode": "whole", "device": args.device},
    }


@torch.no_grad()
def top1(model: torch.nn.Module, points: dict, test_set: tuple, device: torch.device, batch: int = 500) -> float:
    """Top-1 (%) of ``model`` computing through ``points``, float32."""
    from compress.activation_points import quantized_points

    images, labels = test_set
    model = model.to(device).eval()
    correct = 0
    with quantized_points(model, points):
        for start in range(0, len(images), batch):
            logits = model(pixel_values=normalize(images[start : start + batch]).contiguous()).logits
            correct += (logits.argmax(-1) == labels[start : start + batch]).sum().item()
    return 100.0 * correct / len(images)


def block_seconds(layers: dict) -> dict[str, float]:
    """Seconds per reconstructed block (or target outside the blocks), from the stage's layer reports."""
    seconds: dict[str, float] = {}
    for name, details in layers.items():
        block = name.rsplit(".", 2)[0] if ".layers." in name else name
        seconds[block] = details["block_seconds"]
    return seconds


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    test_set = tuple(t.to(device) for t in subset(load_split(args.data, args.cache, "test"), args.test_samples, 0))
    from transformers import AutoModelForImageClassification

    fp = top1(AutoModelForImageClassification.from_pretrained(args.model), {}, test_set, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": {key: str(value) for key, value in vars(args).items()},
        "fp_top1": fp,
        "rows": [],
    }
    print(f"FP top-1 {fp:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = args.out / "bench_fimaq_recipes"
    recipes.mkdir(exist_ok=True)
    for setting in args.settings.split(","):
        for row in args.rows.split(","):
            fields = stage(args, setting, row)
            path = recipes / f"{setting}-{row}.yaml"
            path.write_text(yaml.safe_dump(recipe(args, fields)))
            context, seconds = compress_run(path)
            record = context.report.stages[0]
            per_block = block_seconds(record.layers)
            entry = {
                "setting": setting,
                "row": row,
                "top1": top1(context.model, context.points, test_set, device),
                "apply_seconds": seconds,
                "stage_seconds": record.seconds,
                "block_seconds": per_block,
                "mean_block_seconds": sum(per_block.values()) / max(len(per_block), 1),
                "peak_gpu_gib": record.peak_device_bytes / 2**30,
                "points": len(context.points),
                "stage": fields,
            }
            result["rows"].append(entry)
            result["total_seconds"] = time.perf_counter() - started
            (args.out / "bench_fimaq.json").write_text(json.dumps(result, indent=2))
            print(
                f"{setting} {row}: top-1 {entry['top1']:.2f} (FP {fp:.2f}), stage {record.seconds:.1f} s, "
                f"{entry['mean_block_seconds']:.2f} s/block, peak {entry['peak_gpu_gib']:.2f} GiB",
                flush=True,
            )
    print(table(result))


def table(result: dict) -> str:
    lines = [
        "| setting | row | top-1 (%) | drop from FP (%, relative) | stage (s) | s/block | peak GPU (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    fp = result["fp_top1"]
    for entry in result["rows"]:
        drop = 100 * (fp - entry["top1"]) / fp if fp else float("nan")
        lines.append(
            f"| {entry['setting']} | {entry['row']} | {entry['top1']:.2f} | {drop:.1f} | {entry['stage_seconds']:.1f} "
            f"| {entry['mean_block_seconds']:.2f} | {entry['peak_gpu_gib']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
