"""SR-STE recovery benchmark: SmolLM2 after one-shot SparseGPT 2:4, with and without distillation (GPU).

SmolLM2-135M-Instruct is pruned 2:4 by ``sparsegpt`` (every q/k/v/o/gate/up/down
projection; calibration ``--calibration-samples`` x 512 tokens of WikiText-2 valid), then
trained by ``srste`` on WikiText-2 valid with the masks free to move (the sparse-refined
straight-through estimator, λ_w 2e-4), once with next-token cross-entropy (``loss: ce``)
and once with forward KL to the original model (``loss: forward_kl``), plus, with
``--ste``, the same forward-KL run with ``lambda_w: 0`` (plain STE). Each run goes through
``compress.engine.apply_recipe`` with a recipe written to ``OUT/recipes/`` (so each can be
rerun with ``compress apply``). Reported from each run's report: WikiText-2 test
perplexity and KL to the original over ``--eval-samples`` x 512 tokens, training tokens,
wall time and peak GPU memory of the srste stage, its final SAD (fraction of mask entries
that moved since the start), and the share of the one-shot perplexity gap recovered:
``(ppl_oneshot - ppl_srste) / (ppl_oneshot - ppl_dense)``. Results in OUT/bench_srste.json.

Usage::

    python -m scripts.bench_srste --out OUT                # H100: about 6 minutes
    python -m scripts.bench_srste --smoke --out /tmp/srste  # CPU: a few steps on a few samples (logic check)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["re:.*(q|k|v|o|gate|up|down)_proj$"]
SMOKE = {"steps": 2, "batch_size": 2, "train_samples": 4, "eval_samples": 2, "calibration_samples": 4, "seq_len": 64}
SMOKE_TARGETS = ["re:model\\.layers\\.0\\.mlp\\..*_proj$"]
"""The smoke run prunes and trains the first decoder layer's MLP only (SparseGPT on the CPU is slow)."""


def recipe(args: argparse.Namespace, name: str, training: dict | None) -> dict:
    wikitext = Path(args.data)
    data = {
        "calibration": {
            "path": str(wikitext / "valid.txt"),
            "samples": args.calibration_samples,
            "seq_len": args.seq_len,
        },
        "evaluation": {"path": str(wikitext / "test.txt"), "samples": args.eval_samples, "seq_len": args.seq_len},
    }
    targets = SMOKE_TARGETS if args.smoke else TARGETS
    stages: list[dict] = [{"method": "sparsegpt", "targets": targets, "pattern": "2:4"}]
    if training is not None:
        data["train"] = {"path": str(wikitext / "valid.txt"), "samples": args.train_samples, "seq_len": args.seq_len}
        stages.append(
            {
                "method": "srste",
                "name": name,
                "targets": list(targets),
                "pattern": "2:4",
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_steps": args.steps // 10,
                "log_every": max(1, args.steps // 20),
                **training,
            }
        )
    return {
        "model": {"name": args.model, "dtype": "float32" if args.smoke else "bfloat16"},
        "data": data,
        "stages": stages,
        "evaluate": ["perplexity", "kl"],
    }


def runs(args: argparse.Namespace) -> dict[str, dict | None]:
    """Run name -> the srste stage's own keys (None: the one-shot model alone)."""
    chosen = {"sparsegpt-2of4": None, "srste-ce": {"loss": "ce"}, "srste-forward_kl": {"loss": "forward_kl"}}
    if args.ste:
        chosen["ste-forward_kl"] = {"loss": "forward_kl", "lambda_w": 0.0}
    return chosen


def summarize(report: dict, seconds: float) -> dict:
    evaluation = report["evaluation"]
    row = {
        "perplexity": evaluation["perplexity"]["compressed"],
        "original_perplexity": evaluation["perplexity"]["original"],
        "kl": evaluation["kl"]["compressed"],
        "run_seconds": seconds,
    }
    training = [stage for stage in report["stages"] if stage["method"] == "srste"]
    if training:
        stage = training[0]
        details = stage["details"]
        row.update(
            train_seconds=stage["seconds"],
            tokens=details["tokens"],
            tokens_per_second=details["tokens_per_second"],
            peak_gib=stage["peak_device_bytes"] / 2**30,
            sad=details["sad"],
            sad_curve=details["sad_curve"],
            loss_curve=details["loss_curve"],
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_srste"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name, directory or .gguf file")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW peak learning rate of the srste stages")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--train-samples", type=int, default=448, help="WikiText-2 valid sequences to train on")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ste", action="store_true", help="also the forward-KL run with lambda_w 0 (plain STE)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU logic check")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)

    from compress.engine import apply_recipe
    from compress.validate import check_recipe
    from scripts.common import plugin_host

    (args.out / "recipes").mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, training in runs(args).items():
        path = args.out / "recipes" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(args, name, training), sort_keys=False))
        host = plugin_host("srste", "compress_nm")
        started = time.perf_counter()
        context = apply_recipe(host, check_recipe(host, path))
        rows[name] = summarize(context.report.to_json(), time.perf_counter() - started)
        print(f"{name}: test ppl {rows[name]['perplexity']:.2f}", flush=True)

    dense = rows["sparsegpt-2of4"]["original_perplexity"]
    oneshot = rows["sparsegpt-2of4"]["perplexity"]
    for row in rows.values():
        row["gap_recovered"] = (oneshot - row["perplexity"]) / (oneshot - dense) if oneshot != dense else None
    settings = {key: getattr(args, key) for key in ("model", "steps", "lr", "batch_size", "train_samples", "seq_len")}
    settings.update(calibration_samples=args.calibration_samples, eval_samples=args.eval_samples)
    result = {"settings": settings, "dense_perplexity": dense, "runs": rows}
    (args.out / "bench_srste.json").write_text(json.dumps(result, indent=1))

    print(f"\ndense: test perplexity {dense:.2f}\n")
    print("| model | test ppl | KL to original | gap recovered | tokens | train s | peak GiB | SAD |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        recovered = "-" if row["gap_recovered"] is None else f"{100 * row['gap_recovered']:.0f} %"
        extra = (
            f"{row['tokens']:,} | {row['train_seconds']:.0f} | {row['peak_gib']:.2f} | {row['sad']:.4f}"
            if "tokens" in row
            else "- | - | - | -"
        )
        print(f"| {name} | {row['perplexity']:.2f} | {row['kl']:.3f} | {recovered} | {extra} |")


if __name__ == "__main__":
    main()
