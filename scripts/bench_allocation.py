"""Uniform allocation vs EvoPress vs RCO on SmolLM2-135M-Instruct, at several budgets, in one run.

One candidate database (GPTQ at the given bit widths, symmetric groups of 64, Hessians from
the calibration data, built once by the host's ``SearchMethod.collect``) and one calibration
set serve every method and budget. For each budget (average code bits; the storage budget
adds the scales' 16/group_size bits per weight) the script records, for each method, the KL
to the original and the perplexity on WikiText-2 test, the perplexity on a second domain
(Python source: this repository's ``compress/`` package, split into sequences), the
achieved cost and the search's wall time; the database's wall time is recorded once.
``uniform`` gives every layer the largest bit width whose cost fits the budget.

    python -m scripts.bench_allocation --smoke                  # CPU, minutes
    python -m scripts.bench_allocation --device cuda            # the full sweep (GPU)

Writes JSON (default docs/results/bench_allocation.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from scripts.common import environment

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def code_corpus(directory: Path) -> Path:
    """The second domain: this repository's Python sources as one text file."""
    path = directory / "code.txt"
    path.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "compress").rglob("*.py"))))
    return path


def recipe(args: argparse.Namespace, directory: Path) -> Path:
    """The recipe whose data, model and targets every method shares (its stage is only a carrier)."""
    data = {
        "calibration": {"path": str(WIKITEXT / "valid.txt"), "samples": args.samples, "seq_len": args.seq_len},
        "evaluation": {"path": str(WIKITEXT / "test.txt"), "samples": args.eval_samples, "seq_len": args.seq_len},
        "code": {"path": str(code_corpus(directory)), "samples": args.eval_samples, "seq_len": args.seq_len},
    }
    stage = {
        "method": "rco",
        "targets": [args.targets],
        "providers": ["gptq"],
        "settings": {"bits": args.bits, "group_size": [args.group_size]},
        "budget": {"bits_per_weight": min(args.budgets) + args.group_size_bits},
    }
    text = {"model": "smollm2-135m-instruct", "data": data, "stages": [stage], "run": {"device": args.device}}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def uniform(space) -> list[int]:
    """Every layer at the same, largest setting whose total cost fits the budget."""
    settings = [c.setting for c in space.layers[0].candidates]
    best = None
    for setting in settings:
        choice = [next(k for k, c in enumerate(layer.candidates) if c.setting == setting) for layer in space.layers]
        if space.cost(choice) <= space.target * (1 + 1e-12) and (best is None or space.cost(choice) > space.cost(best)):
            best = choice
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings for a CPU check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5], help="average code bits")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--targets", default="re:.*(q|k|v|o|gate|up|down)_proj$")
    parser.add_argument("--rco-steps", type=int, default=300)
    parser.add_argument("--evo-generations", type=int, default=50, help="the official quant search runs 150")
    parser.add_argument("--evo-offspring", type=int, default=32, help="the official quant search draws 128")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_allocation.json")
    args = parser.parse_args()
    if args.smoke:
        args.budgets, args.bits, args.samples, args.eval_samples, args.seq_len = [3.0], [2, 3, 4], 4, 2, 64
        args.targets = r"re:model\.layers\.[0-1]\..*(q|k|v|o|gate|up|down)_proj$"
        args.rco_steps, args.evo_generations, args.evo_offspring = 8, 2, 4
    args.group_size_bits = 16 / args.group_size

    from compress.api import Budget, Scorer, SearchSpace
    from compress.context import StageRecord, StageRun
    from compress.devices import onloaded
    from compress.engine import load_context
    from compress.host import PluginHost
    from compress.validate import check_recipe
    from compress_rco.evopress import EvoPress
    from compress_rco.rco import RCO

    host = PluginHost()
    host.load_plugins()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        checked = check_recipe(host, recipe(args, Path(scratch)))
        context = load_context(host, checked)
        planned = checked.stages[0]
        modules = dict(context.model.named_modules())
        targets = {name: modules[name] for name in planned.target_names}

        def stage_run(method) -> StageRun:
            record = StageRecord("bench", method.name, method.kind, {}, {})
            return StageRun(checked.recipe.stages[0], method, targets, record, 0, 1)

        started = time.perf_counter()
        layers = planned.method.collect(context, stage_run(planned.method))
        database_seconds = time.perf_counter() - started
        scorers = {
            "wikitext2": Scorer(context, "evaluation", metrics=("kl", "perplexity")),
            "code": Scorer(context, "code", metrics=("kl", "perplexity")),
        }
        common = {"providers": ["gptq"], "settings": {"bits": args.bits, "group_size": [args.group_size]}}
        searches = {
            "uniform": uniform,
            "evopress": lambda space: EvoPress(
                EvoPress.Params(
                    **common,
                    budget=space.budget,
                    generations=args.evo_generations,
                    offspring=args.evo_offspring,
                    survivors=[8, 1],
                    tokens=[2048, 16384] if not args.smoke else [64, 256],
                    initial=args.evo_offspring,
                    initial_tokens=2048 if not args.smoke else 64,
                )
            ).search(context, stage_run(planned.method), space),
            "rco": lambda space: RCO(RCO.Params(**common, budget=space.budget, steps=args.rco_steps)).search(
                context, stage_run(planned.method), space
            ),
        }
        results = []
        whole = onloaded(context.model, context.device) if context.sequential else nullcontext()
        with whole:
            for bits in args.budgets:
                budget = Budget.model_validate({"bits_per_weight": bits + args.group_size_bits})
                space = SearchSpace(layers, budget)
                for name, search in searches.items():
                    started = time.perf_counter()
                    choice = search(space)
                    seconds = time.perf_counter() - started
                    space.put(choice)
                    scores = {domain: scorer.score() for domain, scorer in scorers.items()}
                    counts = {}
                    for layer, k in zip(space.layers, choice):
                        width = layer.candidates[k].setting["bits"]
                        counts[width] = counts.get(width, 0) + 1
                    results.append(
                        {
                            "budget_code_bits": bits,
                            "budget_bits_per_weight": space.target,
                            "method": name,
                            "achieved_bits_per_weight": space.cost(choice),
                            "kl_wikitext2": scores["wikitext2"]["kl"],
                            "ppl_wikitext2": scores["wikitext2"]["perplexity"],
                            "kl_code": scores["code"]["kl"],
                            "ppl_code": scores["code"]["perplexity"],
                            "search_seconds": seconds,
                            "layers_per_bit_width": dict(sorted(counts.items())),
                        }
                    )
                    print(json.dumps(results[-1]), flush=True)
    original = {domain: scorer.score(context.reference_model()) for domain, scorer in scorers.items()}
    report = {
        "environment": environment(args.device),
        "settings": {key: value for key, value in vars(args).items() if key != "json"} | {"json": str(args.json)},
        "database_seconds": database_seconds,
        "candidates": sum(len(layer.candidates) for layer in layers),
        "layers": len(layers),
        "original": {domain: scores["perplexity"] for domain, scores in original.items()},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndatabase (gptq, {report['candidates']} candidates over {len(layers)} layers): {database_seconds:.1f} s")
    print(f"original perplexity: {report['original']}")
    print(f"{'budget':>6} {'method':>9} {'achieved':>9} {'KL wt2':>8} {'ppl wt2':>8} {'ppl code':>8} {'search s':>9}")
    for r in results:
        print(
            f"{r['budget_code_bits']:>6} {r['method']:>9} {r['achieved_bits_per_weight']:>9.4f} "
            f"{r['kl_wikitext2']:>8.4f} {r['ppl_wikitext2']:>8.2f} {r['ppl_code']:>8.2f} {r['search_seconds']:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
