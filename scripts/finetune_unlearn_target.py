"""Fine-tune the models of the unlearning benchmark: the target (trained on every generated item,
the model to unlearn) and one retain model per split (trained on the retain items only, what
forget quality compares with).

Plain supervised fine-tuning through ``compress apply``: the ``distill`` method with the one
loss term ``ce`` (cross-entropy on the data's labels, here the answers of ``source: qa``
records) is SFT on the shared training loop. Its teacher, the original model, is run but
unused by that loss (about one extra forward pass per step), a cost accepted to avoid a
second training loop. Every Linear layer but ``lm_head`` trains (embeddings stay, as the
loop trains targeted modules); TOFU fine-tunes all weights.

    python -m scripts.finetune_unlearn_target --data data/unlearn --out out/unlearn-models
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
from pathlib import Path

import yaml

from scripts.common import plugin_host

SPLITS = (1, 5, 10)


def sft_recipe(model: str, train: Path, samples: int, out: Path, args: argparse.Namespace) -> dict:
    """A recipe that fine-tunes ``model`` on the ``samples`` qa records of ``train`` for ``args.epochs``."""
    return {
        "model": model,
        "data": {
            "train": {
                "path": str(train),
                "source": "qa",
                "samples": samples,
                "seq_len": args.seq_len,
                "loss_on": "answers",
            }
        },
        "stages": [
            {
                "method": "distill",
                "losses": [{"loss": "ce"}],
                "steps": max(1, math.ceil(samples * args.epochs / args.batch_size)),
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_steps": 0,
                "schedule": "linear",
                "weight_decay": 0.01,
                "log_every": 50,
            }
        ],
        "output": {"dir": str(out), "format": "dense"},
        "run": {"device": args.device, "mode": "whole", "seed": args.seed},
    }


def run_recipe(host, recipe: dict, path: Path):
    """Write ``recipe`` to ``path`` and apply it (overwriting its output); the run's context."""
    from compress.engine import apply_recipe
    from compress.validate import check_recipe

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return apply_recipe(host, check_recipe(host, path), overwrite=True)


def stage_seconds(context) -> float:
    """The seconds of a run's stages."""
    return sum(stage.seconds for stage in context.report.stages)


def records(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def unlearn_host():
    """A plugin host with distill (the SFT), the unlearn plugin (its methods, the qa source, the
    metrics) and rtn (the W4 stage), registered by hand where no entry points are installed
    (``PYTHONPATH=.:plugins``)."""
    host = plugin_host("distill")
    for method, module in (("npo", "compress_unlearn"), ("rtn", "compress_rtn")):
        if method not in host.methods():
            host.register(importlib.import_module(module), name=module.removeprefix("compress_"))
    return host


def finetune_one(model: str, name: str, train: Path, out: Path, args: argparse.Namespace) -> float:
    """Fine-tune one model of :func:`finetune_all`; its training seconds."""
    recipe = sft_recipe(model, train, records(train), out / name, args)
    seconds = stage_seconds(run_recipe(unlearn_host(), recipe, out / f"{name}.yaml"))
    print(f"{name}: {seconds:.1f} s on {records(train)} items", flush=True)
    return seconds


def job_devices(device: str) -> list[str]:
    """The devices fine-tuning jobs are dealt to: every visible GPU for ``auto``/``cuda``, else ``device``."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [device]


def finetune_all(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """The target and the retain models of every split of ``data``, under ``out``; their training
    seconds. ``args.finetune_jobs`` processes train at once, dealt over the visible GPUs (one GPU
    runs several 135M models side by side faster than one after another; each process is
    spawned, as CUDA cannot fork)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = {"target": data / "full.jsonl"}
    jobs.update({f"retain{100 - p:02d}": data / f"retain{100 - p:02d}.jsonl" for p in args.splits})
    devices = job_devices(args.device)
    calls = [
        (args.model, name, train, out, argparse.Namespace(**{**vars(args), "device": devices[i % len(devices)]}))
        for i, (name, train) in enumerate(jobs.items())
    ]
    if args.finetune_jobs == 1:
        return {name: finetune_one(*call) for call, name in zip(calls, jobs, strict=True)}
    with multiprocessing.get_context("spawn").Pool(args.finetune_jobs) as pool:
        return dict(zip(jobs, pool.starmap(finetune_one, calls), strict=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning options (shared with scripts.bench_unlearn)."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the model to fine-tune")
    parser.add_argument(
        "--epochs", type=float, default=20.0, help="passes over the data (TOFU: 5, for 7B models that memorize faster)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=3e-4, help="peak learning rate, linear decay (TOFU's 1e-5 is for 7B models)"
    )
    parser.add_argument("--finetune-jobs", type=int, default=1, help="models fine-tuned at once (one GPU holds 4)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=lambda s: [int(p) for p in s.split(",")], default=list(SPLITS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="scripts.make_unlearn_data's output")
    parser.add_argument("--out", type=Path, required=True)
    add_arguments(parser)
    args = parser.parse_args()
    print(json.dumps(finetune_all(args, args.data, args.out)))


if __name__ == "__main__":
    main()
