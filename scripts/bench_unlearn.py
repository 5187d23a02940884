"""The unlearning table in open-unlearning's TOFU layout, on the benchmark this project generates.

Steps, all in one process: generate the TOFU-style data (``scripts.make_unlearn_data``),
fine-tune the target and the retain models (``scripts.finetune_unlearn_target``), then for
each forget split (1/5/10 %) evaluate the target and the retain model (the reference rows)
and run every method (``compress apply`` of an unlearning recipe on the target, in memory)
and evaluate it: forget quality, model utility, forget ROUGE-L, privacy leak, extraction
strength, forget truth ratio, forget exact memorization (did the target learn the set?),
time of the unlearning stage. Last, one method's result before and after W4 round-to-nearest
quantization at each ``--quant-lrs`` (the quantization stage in the same recipe as the
unlearning stage), beside the target and the retain model quantized alike: forget quality is
given against the retain model and against the quantized retain model (``forget_quality_w4``),
since quantization moves both sides of the KS test.

Settings (stated in the JSON): unlearning as open-unlearning's TOFU runs (10 epochs over the
forget set, batch 32 or the whole set when smaller, one warm-up epoch, linear decay, weight
decay 0.01, the methods' default hyperparameters) at each of ``--unlearn-lrs`` (default 1e-4
to 3e-3: TOFU's 1e-5 is for 7B models and barely moves the 135M target); greedy generation of at
most ``--max-new-tokens`` tokens; model utility on the first ``--eval-retain`` retain items
and the world-facts set; privacy leak against the held-out authors of the split's size.

    python -m scripts.bench_unlearn --out out/unlearn-bench             # GPU: the whole table
    python -m scripts.bench_unlearn --out /tmp/unlearn-smoke --smoke    # CPU: tiny Llama, tiny data

Writes ``--out``/unlearn_bench.json (and ``--json`` when given) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scripts.common import environment
from scripts.finetune_unlearn_target import (
    add_arguments,
    finetune_all,
    records,
    run_recipe,
    stage_seconds,
    unlearn_host,
)
from scripts.make_unlearn_data import generate

METHODS = ("ga", "graddiff", "npo", "simnpo", "dipo")
COLUMNS = (
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "privacy_leak",
    "extraction_strength",
    "forget_truth",
    "forget_memorization",
)
PARTS = {"retain_rouge": "data/rouge", "facts_rouge": "facts/rouge"}
"""Model utility's parts printed beside it (header: ``utility_parts`` key): a harmonic mean
follows its smallest part, and these two are the ones that fell near 0."""
HEADER = (*COLUMNS, *PARTS)


def cells(row: dict) -> list[str]:
    """A table row's :data:`HEADER` values, three significant digits."""
    parts = row.get("utility_parts", {})
    return [f"{row[c]:.3g}" for c in COLUMNS] + [f"{parts.get(key, float('nan')):.3g}" for key in PARTS.values()]


def qa_entry(path: Path, samples: int, seq_len: int) -> dict:
    return {"path": str(path), "source": "qa", "samples": samples, "seq_len": seq_len, "loss_on": "answers"}


def unlearn_recipe(args: argparse.Namespace, method: str, percent: int, stages_after: list[dict], lr: float) -> dict:
    """Unlearn forget``percent`` from the target with ``method`` at ``lr``, then ``stages_after``; no output."""
    forget = args.data / f"forget{percent:02d}.jsonl"
    retain = args.data / f"retain{100 - percent:02d}.jsonl"
    count = records(forget)
    batch = min(args.unlearn_batch, count)
    per_epoch = math.ceil(count / batch)
    stage = {
        "method": method,
        "steps": math.ceil(args.unlearn_epochs * per_epoch),
        "batch_size": batch,
        "lr": lr,
        "warmup_steps": per_epoch,
        "schedule": "linear",
        "weight_decay": 0.01,
        "log_every": per_epoch,
    }
    return {
        "model": str(args.models / "target"),
        "data": {
            "forget": qa_entry(forget, count, args.seq_len),
            "retain": qa_entry(retain, records(retain), args.seq_len),
        },
        "stages": [stage, *stages_after],
        "run": {"device": args.device, "mode": "whole", "seed": args.seed},
    }


class Evaluator:
    """The table's metrics for one split, with the retain model's references computed once."""

    def __init__(self, args: argparse.Namespace, percent: int, tokenizer, like: torch.nn.Module) -> None:
        from compress.api import MetricInputs
        from compress.recipe import DataSpec
        from compress_unlearn.data import QASource
        from compress_unlearn.metrics import (
            AnswerRouge,
            ExactMemorization,
            ExtractionStrength,
            ModelUtility,
            PrivacyLeak,
            TruthRatio,
        )

        device = torch.device(args.device_resolved)
        source = QASource()
        files = {
            "forget": args.data / f"forget{percent:02d}.jsonl",
            "retain": args.data / f"retain{100 - percent:02d}.jsonl",
            "holdout": args.data / f"holdout{percent:02d}.jsonl",
            "facts": args.data / "world_facts.jsonl",
        }
        sizes = {name: records(path) for name, path in files.items()}
        sizes["retain"] = min(sizes["retain"], args.eval_retain)
        specs = {name: DataSpec(**qa_entry(path, sizes[name], args.seq_len)) for name, path in files.items()}
        data = {name: source.load(spec, tokenizer) for name, spec in specs.items()}
        self.inputs = {
            name: MetricInputs(data[name], specs[name], tokenizer, device, data.__getitem__)
            for name in ("forget", "retain")
        }
        retain_model = str(args.models / f"retain{100 - percent:02d}")
        generation = {"max_new_tokens": args.max_new_tokens, "batch_size": args.eval_batch}
        self.like, self.batch_size = like, args.eval_batch
        self.quality = self.prepared_quality(retain_model)
        self.leak = PrivacyLeak(
            PrivacyLeak.Params(holdout="holdout", retain_model=retain_model, batch_size=args.eval_batch)
        )
        self.leak.prepare(self.inputs["forget"], like)
        self.utility = ModelUtility(ModelUtility.Params(general=["facts"], **generation))
        self.rouge = AnswerRouge(AnswerRouge.Params(**generation))
        self.extraction = ExtractionStrength(ExtractionStrength.Params(batch_size=args.eval_batch))
        self.truth = TruthRatio(TruthRatio.Params(batch_size=args.eval_batch))
        self.memorization = ExactMemorization(ExactMemorization.Params(batch_size=args.eval_batch))

    def prepared_quality(self, retain_model: Path | str):
        """Forget quality against ``retain_model``, its references computed on the forget set."""
        from compress_unlearn.metrics import ForgetQuality

        quality = ForgetQuality(ForgetQuality.Params(retain_model=str(retain_model), batch_size=self.batch_size))
        quality.prepare(self.inputs["forget"], self.like)
        return quality

    def quality_against(self, retain_model: Path) -> Callable[[torch.nn.Module], float]:
        """Forget quality against another retain model (the one quantized like the rows)."""
        from compress.api import onloaded

        forget, quality = self.inputs["forget"], self.prepared_quality(retain_model)

        def value(model: torch.nn.Module) -> float:
            with onloaded(model.eval(), forget.device):
                return quality.value(model, forget)

        return value

    @torch.no_grad()
    def row(self, model: torch.nn.Module) -> dict[str, float]:
        from compress.api import onloaded

        forget, retain = self.inputs["forget"], self.inputs["retain"]
        with onloaded(model.eval(), forget.device):
            utility = self.utility.parts(model, retain)
            return {
                "forget_quality": self.quality.value(model, forget),
                "model_utility": self.utility.combine(utility),
                "forget_rouge": self.rouge.value(model, forget),
                "privacy_leak": self.leak.value(model, forget),
                "extraction_strength": self.extraction.value(model, forget),
                "forget_truth": self.truth.value(model, forget),
                "forget_memorization": self.memorization.value(model, forget),
                "utility_parts": utility,
            }


def load_dense(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), AutoTokenizer.from_pretrained(
        directory
    )


def bench_split(args: argparse.Namespace, host, percent: int, rows: dict, saved: Callable[[], None]) -> None:
    """Fill ``rows`` with the target, the retain model and each method at each lr, calling ``saved``
    after each row, so a run cut short keeps what it measured."""
    target, tokenizer = load_dense(args.models / "target")
    retain, _ = load_dense(args.models / f"retain{100 - percent:02d}")
    evaluator = Evaluator(args, percent, tokenizer, target)
    rows |= {"target": evaluator.row(target), "retain": evaluator.row(retain)}
    saved()
    print(f"forget{percent:02d} target: {rows['target']}\nforget{percent:02d} retain: {rows['retain']}", flush=True)
    for method, lr in itertools.product(args.methods, args.unlearn_lrs):
        name = method if len(args.unlearn_lrs) == 1 else f"{method}@{lr:g}"
        start = time.perf_counter()
        recipe = unlearn_recipe(args, method, percent, [], lr)
        context = run_recipe(host, recipe, args.out / f"{name}-{percent:02d}.yaml")
        rows[name] = {**evaluator.row(context.model), "seconds": stage_seconds(context), "lr": lr}
        saved()
        print(f"forget{percent:02d} {name}: {rows[name]} ({time.perf_counter() - start:.0f} s)", flush=True)


def bench_quantized(args: argparse.Namespace, host, result: dict, saved: Callable[[], None]) -> None:
    """Fill ``result`` with one method's result before and after W4 (rtn, symmetric g64) at each
    ``args.quant_lrs``, and the target and the retain model quantized alike as reference rows,
    calling ``saved`` after each row."""
    percent, method = max(args.splits), args.quant_method
    retain = f"retain{100 - percent:02d}"
    target, tokenizer = load_dense(args.models / "target")
    evaluator = Evaluator(args, percent, tokenizer, target)
    w4 = {"method": "rtn", "targets": ["re:.*(q|k|v|o|gate|up|down)_proj$"], "bits": 4, "group_size": 64}
    quantize_only = {**unlearn_recipe(args, method, percent, [], args.quant_lrs[0]), "stages": [w4]}
    retain_w4 = args.out / f"{retain}-w4"
    run_recipe(
        host,
        {**quantize_only, "model": str(args.models / retain), "output": {"dir": str(retain_w4), "format": "dense"}},
        args.out / f"{retain}-w4.yaml",
    )
    against_w4 = evaluator.quality_against(retain_w4)

    def quantized_row(model: torch.nn.Module) -> dict:
        return {**evaluator.row(model), "forget_quality_w4": against_w4(model)}

    result |= {"split": f"forget{percent:02d}", "method": method, "quantization": w4, "runs": {}}
    result["retain_w4"] = quantized_row(load_dense(retain_w4)[0])
    result["target_w4"] = quantized_row(run_recipe(host, quantize_only, args.out / "target-w4.yaml").model)
    saved()
    for lr in args.quant_lrs:
        before = run_recipe(host, unlearn_recipe(args, method, percent, [], lr), args.out / f"{method}-{lr:g}.yaml")
        after = run_recipe(host, unlearn_recipe(args, method, percent, [w4], lr), args.out / f"{method}-{lr:g}-w4.yaml")
        result["runs"][f"{lr:g}"] = {"before": evaluator.row(before.model), "after_w4": quantized_row(after.model)}
        saved()
        print(f"{method}@{lr:g} before and after W4: {result['runs'][f'{lr:g}']}", flush=True)


def markdown(results: dict) -> str:
    lines = []
    for split, rows in results["table"].items():
        lines += [
            f"\n{split}\n",
            "| model | " + " | ".join(HEADER) + " | time (s) |",
            "|---" * (len(HEADER) + 2) + "|",
        ]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(cells(row)) + f" | {row.get('seconds', float('nan')):.1f} |")
    return "\n".join(lines)


def save(args: argparse.Namespace, results: dict, name: str = "unlearn_bench.json") -> None:
    """Write ``results`` to ``args.out / name`` and to ``--json`` when given."""
    text = json.dumps(results, indent=2)
    (args.out / name).write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(text, encoding="utf-8")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--smoke``'s settings and the derived paths and device applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. docs/results/unlearn.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 10 authors, short runs (CPU)")
    parser.add_argument("--authors", type=int, default=100)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--unlearn-epochs", type=float, default=10.0)
    parser.add_argument("--unlearn-batch", type=int, default=32)
    parser.add_argument(
        "--unlearn-lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[1e-4, 3e-4, 1e-3, 3e-3],
        help="learning rates, each method run at each (open-unlearning's TOFU: 1e-5, for 7B models)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-retain", type=int, default=100, help="retain items in model utility")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--quant-method", default="npo")
    parser.add_argument(
        "--quant-lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        help="learning rates of the W4 rows (default: the first of --unlearn-lrs)",
    )
    parser.add_argument("--skip-quantized", action="store_true", help="no W4 rows (before/after quantization)")
    parser.add_argument("--skip-finetune", action="store_true", help="reuse --out/models")
    parser.add_argument("--skip-table", action="store_true", help="only the W4 rows (on the largest of --splits)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        from compress.pytest_plugin import build_tiny_model

        args.model = str(build_tiny_model(args.out / "tiny"))
        args.authors, args.splits, args.epochs, args.unlearn_epochs = 10, [10], 1.0, 2.0
        args.max_new_tokens, args.eval_retain, args.unlearn_lrs = 8, 10, [1e-3]
    args.quant_lrs = args.quant_lrs or args.unlearn_lrs[:1]
    args.device_resolved = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.data, args.models = args.out / "data", args.out / "models"
    return args


def main() -> None:
    args = parse_arguments()
    start = time.perf_counter()
    meta = generate(args.data, args.authors, 10, args.seed)
    if not args.skip_finetune:
        finetune_seconds = finetune_all(args, args.data, args.models)
    host = unlearn_host()
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": meta,
        "finetune_seconds": None if args.skip_finetune else finetune_seconds,
        "environment": environment(args.device_resolved),
        "table": {},
    }
    for percent in [] if args.skip_table else args.splits:
        results["table"][f"forget{percent:02d}"] = {}
        bench_split(args, host, percent, results["table"][f"forget{percent:02d}"], lambda: save(args, results))
    if not args.skip_quantized:
        results["quantization"] = {}
        bench_quantized(args, host, results["quantization"], lambda: save(args, results))
    results["total_seconds"] = time.perf_counter() - start
    save(args, results)
    print(markdown(results))
    print(json.dumps(results.get("quantization"), indent=2))
    print(f"total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
