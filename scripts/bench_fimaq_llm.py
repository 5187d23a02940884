"""FIMA-Q on SmolLM2-135M-Instruct's decoder blocks against gptq and rtn at the same weight bits (GPU).

Each row is one ``compress apply`` recipe (in this process, no output written) on the same
calibration set (WikiText-2 valid, ``--calibration`` x ``--seq-len`` tokens) and the same
evaluation (WikiText-2 test, ``--eval-samples`` x ``--eval-seq-len``: perplexity, and KL to the
original model's next-token distribution, ``evaluate: [perplexity, kl]``). Every row has
4-bit weights on an asymmetric min-max grid with one 16-bit scale and one 8-bit zero point per
output row of every decoder Linear (FIMA-Q's weight grid; lm_head and the embeddings stay in
float), hence the same storage, which the table states from the run's recorded grids.

- ``rtn-w4aN``: ``rtn`` weights, inputs of every Linear quantized dynamically per token,
  symmetric N bits (the floor).
- ``gptq-w4aN``: ``gptq`` cannot quantize activations itself; the host's composition is an
  ``rtn`` stage that records the grid and the dynamic per-token inputs, then ``gptq`` with
  ``grid: inherit`` (the same min-max grid GPTQ would compute per row) re-choosing the codes
  against the original weights; the inputs stay quantized as ``rtn`` recorded them.
- ``fimaq-w4aN`` (loss dplr) and ``fimaq-mse-w4aN``: recipes/fimaq/smollm2-w4a8.yaml's settings
  with ``--iterations`` per block: static activation scales (one per tensor or per head) at
  every Linear input and at the attention's query, key, value and probabilities. FIMA-Q
  thus quantizes more (the attention matmuls too) with coarser (static) scales than the
  baselines' dynamic per-token ones: the comparison favours the baselines.
- ``fimaq-minmax-w4aN``: the same points with static min-max ranges and weights rounded to
  nearest on min-max grids, no search, no reconstruction: what static activations alone cost.

Rows run in ``--rows`` order; ``bench_fimaq_llm.json`` in ``--out`` (and ``--json``) is written
after each. ``--smoke``: a two-layer random Llama with a byte tokenizer, tiny sizes, on the CPU.

Usage::

    python -m scripts.bench_fimaq_llm --out OUT                       # H100, est. 4-6 minutes
    python -m scripts.bench_fimaq_llm --smoke --out /tmp/fl           # CPU check of the script
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from scripts.common import environment, markdown_table, save_results
from scripts.train_cifar import compress_run

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
WEIGHTS = {"bits": 4, "symmetric": False, "group_size": None}
"""FIMA-Q's weight grid: asymmetric, one scale and zero point per output row."""
ROWS = [f"{row}-w4a{bits}" for bits in (8, 4) for row in ("rtn", "gptq", "fimaq", "fimaq-mse", "fimaq-minmax")]


def stages(args: argparse.Namespace, row: str) -> list[dict]:
    """The recipe stages of ``row`` (``<method>[-mse|-minmax]-w4a<bits>``)."""
    method, activation_bits = row.split("-")[0], int(row.rsplit("a", 1)[1])
    if method in ("rtn", "gptq"):
        dynamic = {"bits": activation_bits, "symmetric": True, "strategy": "token", "dynamic": True}
        result = [{"method": "rtn", **WEIGHTS, "activations": dynamic}]
        if method == "gptq":
            result.append({"method": "gptq", **WEIGHTS, "grid": "inherit"})
        return result
    fimaq = {
        "method": "fimaq",
        "bits": 4,
        "activation_bits": activation_bits,
        "token_scales": False,
        "channel_inputs": False,
        "batch_size": min(8, args.calibration),
        "fisher_batch_size": min(8, args.calibration),
        "iterations": args.iterations,
        "loss": "mse" if "-mse-" in row else "dplr",
    }
    if "-minmax-" in row:  # FIMA-Q's points and grids with min-max ranges, rounded to nearest
        fimaq.update({"range_search": False, "reconstruct": False})
    if args.smoke:
        fimaq.update({"search_steps": 8, "search_samples": 4})
    return [fimaq]


def recipe(args: argparse.Namespace, row: str) -> dict:
    calibration = {"path": str(args.data / "valid.txt"), "samples": args.calibration, "seq_len": args.seq_len}
    evaluation = {"path": str(args.data / "test.txt"), "samples": args.eval_samples, "seq_len": args.eval_seq_len}
    return {
        "model": args.model,
        "data": {"calibration": calibration, "evaluation": evaluation},
        "stages": stages(args, row),
        "output": None,
        "run": {"device": args.device},
        "evaluate": ["perplexity", "kl"],
    }


def storage(context) -> dict:
    """Bits per weight of the quantized layers, codes plus each grid's scales and zero points."""
    from compress.api import grid_storage_bits, weight_matrix

    weights = bits = layers = 0
    for name, state in context.layers.items():
        if state.quant is not None:
            shape = tuple(weight_matrix(context.model.get_submodule(name).weight).shape)
            weights, bits, layers = (
                weights + shape[0] * shape[1],
                bits + grid_storage_bits(shape, state.quant.scheme),
                layers + 1,
            )
    return {"layers": layers, "bits_per_weight": bits / max(weights, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default="rtn-w4a8,gptq-w4a8,fimaq-minmax-w4a8,fimaq-w4a8", help=f"comma-separated, of {ROWS}"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of WikiText-2 valid.txt and test.txt")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--eval-samples", type=int, default=32, help="evaluation windows")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--iterations", type=int, default=200, help="fimaq iterations per block (the paper: 20,000)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_fimaq_llm"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama on the CPU")
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: {ROWS}")
    if args.smoke:
        from compress.pytest_plugin import build_tiny_model

        args.model = str(build_tiny_model(args.out / "tiny"))
        args.calibration, args.seq_len, args.eval_samples, args.eval_seq_len = 4, 32, 4, 64
        args.iterations = min(args.iterations, 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = args.out / "recipes"
    recipes.mkdir(exist_ok=True)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "environment": environment(args.device)}
    result["rows"] = []
    for row in args.rows.split(","):
        raw = recipe(args, row)
        path = recipes / f"{row}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"{row}: running", flush=True)
        context, seconds = compress_run(path)
        evaluation, records = context.report.evaluation, context.report.stages
        entry = {
            "row": row,
            "perplexity": evaluation["perplexity"]["compressed"],
            "original_perplexity": evaluation["perplexity"]["original"],
            "kl": evaluation["kl"]["compressed"],
            "stage_seconds": sum(record.seconds for record in records),
            "apply_seconds": seconds,
            "peak_gpu_gib": max(record.peak_device_bytes for record in records) / 2**30,
            "storage": storage(context),
            "activation_points": len(context.points),
            "stages": raw["stages"],
        }
        result["rows"].append(entry)
        for target in (args.out / "bench_fimaq_llm.json", args.json):
            save_results(target, "bench_fimaq_llm.json", "bench_fimaq_llm", argv, result)
        print(
            f"{row}: ppl {entry['perplexity']:.3f} (original {entry['original_perplexity']:.3f}), "
            f"KL {entry['kl']:.4f}, stages {entry['stage_seconds']:.1f} s, peak {entry['peak_gpu_gib']:.2f} GiB",
            flush=True,
        )
        del context
    print(table(result["rows"]))


def table(rows: list[dict]) -> str:
    """The markdown table of the measured rows."""
    columns = ["row", "weight bits/weight (incl. scales)", "ppl", "KL to original", "stage (s)", "peak GPU (GiB)"]
    cells = [
        [
            r["row"],
            f"{r['storage']['bits_per_weight']:.3f} ({r['storage']['layers']} layers)",
            f"{r['perplexity']:.3f}",
            f"{r['kl']:.4g}",
            f"{r['stage_seconds']:.1f}",
            f"{r['peak_gpu_gib']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)


if __name__ == "__main__":
    main()
