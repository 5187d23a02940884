"""Distillation benchmark: recovering SmolLM2 after 3-bit round-to-nearest (GPU).

SmolLM2-135M-Instruct is quantized with ``rtn`` W3 symmetric g64 (all q/k/v/o/gate/up/down
projections), then distilled from the original model on WikiText-2 valid, the student
training through its fixed 3-bit grids (straight-through; ``latent_weights: original``).
One run per loss (forward KL, reverse KL, generalized JSD(0.5)), each through ``compress
apply`` itself, plus the quantized model without distillation. Reported from each run's
report.json: WikiText-2 test perplexity and KL(original || model) over ``--eval-samples``
x 512 tokens, training wall time, tokens/s and peak GPU memory.

The written recipes are also what the multi-GPU comparison runs::

    python -m scripts.bench_distill --out OUT                   # the table
    accelerate launch --num_processes 2 -m compress apply OUT/recipes/forward_kl-2gpu.yaml
    python -m compress apply OUT/recipes/forward_kl-1gpu.yaml
    python -m scripts.bench_distill --compare OUT/runs/forward_kl-1gpu OUT/runs/forward_kl-2gpu

``forward_kl-1gpu-compile`` and ``forward_kl-2gpu-compile`` are the same runs with
``compile: true``. At batch 16 x 512 a step is bound by the host (kernel launches and
Python, repeated by every process), so two GPUs barely help; ``--batch-size 64
--micro-batch-size 16`` makes each device's work large enough to scale.

``--plot OUT/bench_distill.json curves.png`` draws the loss curves (needs matplotlib).
``--compare`` prints both loss curves, their largest gap relative to the step-to-step
noise of the one-GPU curve, and the speed-up. The two recipes are the same run
(``batch_size`` is the global batch, ``--batch-size``, 16, split over the GPUs); only their
output directories differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["re:.*(q|k|v|o|gate|up|down)_proj$"]
LOSSES = {
    "forward_kl": {"loss": "forward_kl"},
    "reverse_kl": {"loss": "reverse_kl"},
    "jsd": {"loss": "jsd", "beta": 0.5},
}


def recipe(
    args: argparse.Namespace, name: str, loss: dict | None, batch_size: int, out: Path, compiled: bool = False
) -> dict:
    wikitext = Path(args.data)
    stages = [{"method": "rtn", "targets": TARGETS, "bits": 3, "group_size": 64}]
    data = {"evaluation": {"path": str(wikitext / "test.txt"), "samples": args.eval_samples, "seq_len": 512}}
    if loss is not None:
        data["train"] = {"path": str(wikitext / "valid.txt"), "samples": args.train_samples, "seq_len": 512}
        stages.append(
            {
                "method": "distill",
                "name": name,
                "targets": TARGETS,
                "losses": [loss],
                "steps": args.steps,
                "batch_size": batch_size,
                "lr": args.lr,
                "warmup_steps": args.steps // 10,
                "latent_weights": "original",
                "log_every": 5,
            }
        )
        if args.micro_batch_size:
            stages[-1]["micro_batch_size"] = args.micro_batch_size
        if compiled:
            stages[-1]["compile"] = True
    return {
        "model": {"name": args.model, "dtype": "bfloat16"},
        "data": data,
        "stages": stages,
        "output": {"dir": str(out / "runs" / name), "format": "dense"},
        "evaluate": ["perplexity", "kl"],
    }


def write_recipes(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    batch = args.batch_size
    recipes = {"rtn-w3g64": recipe(args, "rtn-w3g64", None, batch, out)}
    for name, loss in LOSSES.items():
        recipes[name] = recipe(args, name, loss, batch, out)
    recipes["forward_kl-1gpu"] = recipe(args, "forward_kl-1gpu", LOSSES["forward_kl"], batch, out)
    recipes["forward_kl-2gpu"] = recipe(args, "forward_kl-2gpu", LOSSES["forward_kl"], batch, out)
    for gpus in ("1gpu", "2gpu"):
        name = f"forward_kl-{gpus}-compile"
        recipes[name] = recipe(args, name, LOSSES["forward_kl"], batch, out, compiled=True)
    paths = {}
    for name, content in recipes.items():
        paths[name] = out / "recipes" / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(content, sort_keys=False))
    return paths


def summarize(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    evaluation = report["evaluation"]
    row = {
        "perplexity": evaluation["perplexity"]["compressed"],
        "original_perplexity": evaluation["perplexity"]["original"],
        "kl": evaluation["kl"]["compressed"],
    }
    training = [stage for stage in report["stages"] if stage["method"] == "distill"]
    if training:
        stage = training[0]
        row.update(
            seconds=stage["seconds"],
            tokens_per_second=stage["details"]["tokens_per_second"],
            steady_tokens_per_second=stage["details"].get("steady_tokens_per_second"),
            peak_gib=stage["peak_device_bytes"] / 2**30,
            loss_curve=stage["details"]["loss_curve"],
            devices=stage["details"]["devices"],
        )
    return row


def run_table(args: argparse.Namespace, out: Path) -> None:
    from compress.engine import apply_recipe
    from compress.host import get_host
    from compress.validate import check_recipe

    paths = write_recipes(args, out)
    rows = {}
    for name in ["rtn-w3g64", *LOSSES]:
        host = get_host()
        apply_recipe(host, check_recipe(host, paths[name], overwrite=True), overwrite=True)
        rows[name] = summarize(out / "runs" / name)
    (out / "bench_distill.json").write_text(json.dumps(rows, indent=1))
    first = rows["rtn-w3g64"]
    print(f"\noriginal: perplexity {first['original_perplexity']:.2f}\n")
    print("| model | test ppl | KL to original | train s | tokens/s | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        label = name if name == "rtn-w3g64" else f"rtn-w3g64 + distill {name}"
        extra = (
            f"{row['seconds']:.0f} | {row['tokens_per_second']:.0f} | {row['peak_gib']:.2f}"
            if "seconds" in row
            else "- | - | -"
        )
        print(f"| {label} | {row['perplexity']:.2f} | {row['kl']:.3f} | {extra} |")


def compare(one: Path, two: Path) -> None:
    a, b = summarize(one), summarize(two)
    curve_a, curve_b = dict(a["loss_curve"]), dict(b["loss_curve"])
    steps = sorted(curve_a.keys() & curve_b.keys())
    gaps = [abs(curve_a[s] - curve_b[s]) for s in steps]
    noise = [abs(curve_a[s] - curve_a[t]) for s, t in itertools.pairwise(steps)]
    print("| step | 1 GPU loss | 2 GPU loss |\n| ---: | ---: | ---: |")
    for step in steps:
        print(f"| {step} | {curve_a[step]:.4f} | {curve_b[step]:.4f} |")
    print(
        f"\nlargest gap {max(gaps):.4f}, median step-to-step change of the 1-GPU curve "
        f"{sorted(noise)[len(noise) // 2]:.4f}; training {a['seconds']:.1f} s vs {b['seconds']:.1f} s "
        f"(speed-up {a['seconds'] / b['seconds']:.2f}x, tokens/s {a['tokens_per_second']:.0f} vs "
        f"{b['tokens_per_second']:.0f}); test ppl {a['perplexity']:.2f} vs {b['perplexity']:.2f}"
    )
    if a["steady_tokens_per_second"] and b["steady_tokens_per_second"]:
        ratio = b["steady_tokens_per_second"] / a["steady_tokens_per_second"]
        print(
            f"global tokens/s after the first step: {a['steady_tokens_per_second']:.0f} vs "
            f"{b['steady_tokens_per_second']:.0f} ({ratio:.2f}x; target >= 1.8x)"
        )


def plot(results: Path, image: Path) -> None:
    """Loss curves of the distillation runs in ``results`` (bench_distill.json) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results.read_text())
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, row in rows.items():
        if "loss_curve" in row:
            steps, losses = zip(*row["loss_curve"])
            axis.plot(steps, losses, label=f"{name} (test ppl {row['perplexity']:.1f})")
    axis.set(xlabel="step", ylabel="training loss", title="SmolLM2 rtn W3 g64, distilled from the original")
    axis.legend()
    figure.tight_layout()
    figure.savefig(image, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_distill"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name, directory or .gguf file")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (the global batch)")
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="sequences per device and forward pass (accumulating)"
    )
    parser.add_argument("--train-samples", type=int, default=448)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--recipes-only", action="store_true", help="write the recipes and stop")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("ONE_GPU_RUN", "TWO_GPU_RUN"))
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("RESULTS_JSON", "PNG"), help="draw the loss curves")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.plot:
        plot(*args.plot)
    elif args.recipes_only:
        for path in write_recipes(args, args.out).values():
            print(path)
    else:
        run_table(args, args.out)


if __name__ == "__main__":
    main()
