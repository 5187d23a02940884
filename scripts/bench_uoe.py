"""UOE against unlearning the whole mixture of experts, on the generated TOFU-style benchmark.

Steps: generate the benchmark (``scripts.make_unlearn_data``); upcycle SmolLM2-135M-Instruct
into a Mixtral and fine-tune it on every item (the target) and, from the same upcycled
start, on retain90 only (the retain model) with ``scripts.upcycle_moe``; then on forget10,
for each loss (ga, npo): ``uoe`` (one expert and its router, constant lr, at SEUF's 2e-4 and
the 1e-3 and 3e-3 that one expert needs to forget on this target) and the same loss on the whole
MoE (every Linear, fused expert tensor and router; open-unlearning's TOFU settings at lr 1e-4 and
3e-4, as ``scripts.bench_unlearn``). Each row: the table's metrics (``scripts.bench_unlearn.Evaluator``),
the unlearning time, the trained parameter count. Expectation from the paper: at similar
forgetting, uoe keeps more utility while training under 1 % of the parameters.

    python -m scripts.bench_uoe --out out/uoe-bench --json docs/results/uoe.json   # GPU
    python -m scripts.bench_uoe --out /tmp/uoe-smoke --smoke                       # CPU: tiny Llama
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scripts.bench_unlearn import HEADER, Evaluator, cells, load_dense, save, unlearn_recipe
from scripts.common import environment
from scripts.finetune_unlearn_target import run_recipe, stage_seconds, unlearn_host
from scripts.make_unlearn_data import generate
from scripts.upcycle_moe import add_arguments, make_moe

PERCENT = 10
WHOLE_MOE = ["Linear", "MixtralExperts", "MixtralTopKRouter"]


def runs(args: argparse.Namespace) -> dict[str, dict]:
    """Each row's recipe: uoe at each of ``--uoe-lrs`` and the whole MoE at each of ``--unlearn-lrs``,
    for each loss."""
    table = {}
    for loss in args.losses:
        for lr in args.uoe_lrs:
            recipe = unlearn_recipe(args, "uoe", PERCENT, [], lr)
            recipe["stages"][0].update(loss=loss, schedule="constant", warmup_steps=0, weight_decay=0.0)
            table[f"uoe-{loss}@{lr:g}"] = recipe
        for lr in args.unlearn_lrs:
            recipe = unlearn_recipe(args, loss, PERCENT, [], lr)
            recipe["stages"][0].update(targets=WHOLE_MOE, ignore=["lm_head"])
            table[f"moe-{loss}@{lr:g}"] = recipe
    return table


def trained(context) -> int:
    """The parameters the run's unlearning stage trained."""
    details = context.report.stages[0].details
    if "uoe" in details:
        return details["uoe"]["trained_parameters"]
    return sum(layer["trained_parameters"] for layer in context.report.stages[0].layers.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. docs/results/uoe.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 10 authors, short runs (CPU)")
    parser.add_argument("--authors", type=int, default=100)
    parser.add_argument("--losses", type=lambda s: s.split(","), default=["ga", "npo"])
    parser.add_argument("--uoe-lrs", type=lambda s: [float(v) for v in s.split(",")], default=[2e-4, 1e-3, 3e-3])
    parser.add_argument("--unlearn-epochs", type=float, default=10.0)
    parser.add_argument("--unlearn-batch", type=int, default=32)
    parser.add_argument(
        "--unlearn-lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[1e-4, 3e-4],
        help="the whole-MoE runs' lrs (open-unlearning's TOFU: 1e-5, for 7B models)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-retain", type=int, default=100, help="retain items in model utility")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--skip-upcycle", action="store_true", help="reuse --out/models")
    add_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        from compress.pytest_plugin import build_tiny_model

        args.model = str(build_tiny_model(args.out / "tiny"))
        args.authors, args.experts, args.epochs, args.unlearn_epochs = 10, 4, 1.0, 1.0
        args.max_new_tokens, args.eval_retain, args.eval_batch = 8, 10, 16
        args.uoe_lrs, args.unlearn_lrs = [1e-3], [1e-4]
    args.device_resolved = args.device
    args.data, args.models = args.out / "data", args.out / "models"
    start = time.perf_counter()
    meta = generate(args.data, args.authors, 10, args.seed)
    upcycled = {}
    if not args.skip_upcycle:
        for name, records in (("target", "full"), (f"retain{100 - PERCENT}", f"retain{100 - PERCENT}")):
            upcycled[name] = make_moe(args, args.data / f"{records}.jsonl", args.models / name)
            print(f"{name}: loss {upcycled[name]['loss_first']:.3f} -> {upcycled[name]['loss_last']:.3f}", flush=True)
    target, tokenizer = load_dense(args.models / "target")
    retain, _ = load_dense(args.models / f"retain{100 - PERCENT}")
    total = sum(p.numel() for p in target.parameters())
    evaluator = Evaluator(args, PERCENT, tokenizer, target)
    rows = {"target": evaluator.row(target), "retain": evaluator.row(retain)}
    print(f"target: {rows['target']}\nretain: {rows['retain']}", flush=True)
    del retain
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": meta,
        "upcycle": upcycled,
        "table": rows,
        "environment": environment(args.device),
    }
    host = unlearn_host()
    for name, recipe in runs(args).items():  # the JSON is written after each row, so a run cut short keeps them
        context = run_recipe(host, recipe, args.out / f"{name}.yaml")
        count = trained(context)
        rows[name] = {
            **evaluator.row(context.model),
            "seconds": stage_seconds(context),
            "trained_parameters": count,
            "trained_fraction": count / total,
            "expert": context.report.stages[0].details.get("uoe", {}).get("expert"),
            "layer": context.report.stages[0].details.get("uoe", {}).get("layer"),
        }
        print(f"{name}: {rows[name]}", flush=True)
        save(args, results, "uoe_bench.json")
    results["total_seconds"] = time.perf_counter() - start
    save(args, results, "uoe_bench.json")
    print("| model | " + " | ".join(HEADER) + " | trained % | time (s) |")
    print("|---" * (len(HEADER) + 3) + "|")
    for name, row in rows.items():
        share = f"{100 * row['trained_fraction']:.3f}" if "trained_fraction" in row else "-"
        print(f"| {name} | {' | '.join(cells(row))} | {share} | {row.get('seconds', float('nan')):.1f} |")
    print(f"total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
