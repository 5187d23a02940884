"""SparseGPT 2:4 at Llama-3-8B shape: time per decoder layer and peak GPU memory, ours and
LLM Compressor's, on the same random model and the same calibration tokens (GPU).

The model, the calibration data and the measurement are those of
``scripts.bench_gptq_gpu`` (its helpers are reused): a random-weight bf16 model of
Llama-3-8B's shape with ``--layers`` decoder layers (default 4; every layer has the same
work, so the median time per layer is the full model's), 128 sequences of 2048 random
token ids, ``run.mode: sequential`` (one decoder layer on the GPU at a time) through
``compress.engine.run_stages``. Ours is the ``sparsegpt`` method of ``compress_nm`` at
``pattern: "2:4"`` with its defaults (recorded in the JSON; ``cuda_graphs: true`` replays
each block's column loop from a CUDA graph), on every Linear but lm_head;
LLM Compressor's ``SparseGPTModifier`` runs with ``sparsity: 0.5, mask_structure: "2:4"``,
block 128, dampening 0.01 (its defaults), ``targets: [Linear]``, ``ignore: ["re:.*lm_head"]`` (a plain ``lm_head`` does not match there),
through the sequential pipeline ``oneshot`` uses (model loading and dataset processing
skipped: the data is already token ids). Each run is a subprocess of its own, so peak
memories are its own. Both results are checked: every pruned layer holds 2:4.

Usage (GPU, after ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl .whl-lc/*.whl``)::

    PYTHONPATH=/tmp/site:.:plugins python -m scripts.bench_sparsegpt_gpu --layers 4   # H100: about 5 minutes
    python -m scripts.bench_sparsegpt_gpu --tiny --device cpu --no-llmcompressor        # CPU logic check

Results go to ``--json`` or ``$OUT/bench_sparsegpt_gpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from compress_nm.patterns import NMPattern, is_nm_sparse
from scripts.bench_gptq_gpu import Progress, build, calibration, datasets_stand_in, run_modifier, warm_up
from scripts.common import StageClock, build_context, environment, gib, plugin_host

ROOT = Path(__file__).resolve().parents[1]
TWO_FOUR = NMPattern(2, 4)


def all_two_four(modules: list[torch.nn.Module]) -> bool:
    return all(is_nm_sparse(module.weight.detach(), TWO_FOUR) for module in modules)


def split_seconds(reports: dict[str, dict]) -> dict[str, float]:
    """Median over decoder layers of the time their Hessian pass took and the sum of their solves."""
    solves: dict[str, float] = {}
    hessians: dict[str, float] = {}
    for name, report in reports.items():
        layer = name.split(".mlp.")[0].split(".self_attn.")[0]
        solves[layer] = solves.get(layer, 0.0) + report["seconds"]
        hessians[layer] = report["hessian_seconds"]
    return {"hessians": statistics.median(hessians.values()), "solves": statistics.median(solves.values())}


def run_ours(args: argparse.Namespace) -> dict:
    from compress.engine import run_stages

    device = torch.device(args.device)
    config, model, build_seconds, params = build(args)
    host = plugin_host("sparsegpt", "compress_nm")
    clock = StageClock(device)
    host.register(Progress(clock), name="bench-progress")
    host.register(clock, name="bench-stage-clock")  # pluggy calls the last registered first
    context, checked = build_context(
        host, model, config, "sequential", device, {"method": "sparsegpt", "pattern": "2:4"}
    )
    samples = calibration(args, config)
    context._data["calibration"] = [{"input_ids": ids, "labels": ids} for ids in samples]  # compress.data.Sample
    warm_up(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run_stages(context, checked)
    record, totals = context.report.stages[0], context.report.phases["stages"]
    seconds = [b - a for a, b in itertools.pairwise(clock.marks)]
    modules = dict(model.named_modules())
    names = checked.stages[0].target_names
    return {
        "run": "compress sparsegpt",
        "settings": checked.stages[0].method.params.model_dump(mode="json"),
        "device": str(device),
        "parameters": params,
        "decoder_layers": config.num_hidden_layers,
        "calibration": {"samples": len(samples), "seq_len": len(samples[0])},
        "build_seconds": build_seconds,
        "stage_seconds": record.seconds,
        "layer_seconds": seconds,
        "median_layer_seconds": statistics.median(seconds),
        "median_split_seconds": split_seconds(record.layers),
        "peak_device_bytes": totals["peak_device_bytes"],
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checks": {
            "layers_pruned": len(record.layers),
            "layers_expected": len(names),
            "all_2_of_4": all_two_four([modules[name] for name in names]),
            "recorded_2_of_4": all(context.layers[name].sparsity == "2:4" for name in names),
        },
    }


def run_llmcompressor(args: argparse.Namespace) -> dict:
    datasets_stand_in()
    import llmcompressor
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from torch.utils.data import DataLoader

    device = torch.device(args.device)
    config, model, build_seconds, params = build(args)
    samples = calibration(args, config)
    loader = DataLoader(samples, batch_size=1, collate_fn=lambda batch: {"input_ids": torch.stack(batch)})
    modifier = SparseGPTModifier(
        sparsity=0.5,
        mask_structure="2:4",
        block_size=128,
        dampening_frac=0.01,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    seconds, stage_seconds = run_modifier(model, modifier, loader, device)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return {
        "run": f"llmcompressor {llmcompressor.__version__} SparseGPTModifier",
        "settings": {"sparsity": 0.5, "mask_structure": "2:4", "block_size": 128, "dampening_frac": 0.01},
        "device": str(device),
        "parameters": params,
        "decoder_layers": config.num_hidden_layers,
        "calibration": {"samples": len(samples), "seq_len": len(samples[0])},
        "build_seconds": build_seconds,
        "stage_seconds": stage_seconds,
        "layer_seconds": seconds,
        "median_layer_seconds": statistics.median(seconds),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checks": {"layers_expected": len(linears), "all_2_of_4": all_two_four(linears)},
    }


def child(args: argparse.Namespace, which: str) -> dict | None:
    """One run in a subprocess of its own (its own peak memory); None when it failed."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "scripts.bench_sparsegpt_gpu", "--child", which, "--result", str(result)]
        command += ["--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
        command += ["--tiny"] if args.tiny else []
        for flag, value in (("--layers", args.layers), ("--samples", args.samples), ("--seq-len", args.seq_len)):
            command += [flag, str(value)] if value is not None else []
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        if not result.exists():
            print(f"the {which} run failed (exit {code})", file=sys.stderr)
            return None
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="a small Llama (hidden 256) and 8 x 128 tokens")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--no-llmcompressor", action="store_true", help="skip LLM Compressor's run")
    parser.add_argument("--json", type=Path, default=None, help="results file (default $OUT/bench_sparsegpt_gpu.json)")
    parser.add_argument("--child", choices=["ours", "llmcompressor"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_ours(args) if args.child == "ours" else run_llmcompressor(args)
        print(json.dumps(result), flush=True)
        args.result.write_text(json.dumps(result))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu)")
    env = environment(args.device)
    results = [r for r in [child(args, "ours")] if r is not None]
    if not args.no_llmcompressor:
        if importlib.util.find_spec("llmcompressor") is None:
            print("llmcompressor is not importable: LLM Compressor's SparseGPT not run", flush=True)
        else:
            results += [r for r in [child(args, "llmcompressor")] if r is not None]
    if not results:
        return 1
    print(f"\nSparseGPT 2:4, sequential, {results[0]['decoder_layers']} decoder layers, device {args.device}")
    print(
        "| run | per layer, median (s) | Hessians (s) | solves (s) | stage (s) | peak GPU allocated (GiB) "
        "| peak GPU reserved (GiB) | all 2:4 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        split = r.get("median_split_seconds", {})
        parts = " | ".join(f"{split[k]:.2f}" if k in split else "–" for k in ("hessians", "solves"))
        print(
            f"| {r['run']} | {r['median_layer_seconds']:.2f} | {parts} | {r['stage_seconds']:.1f} "
            f"| {gib(r['peak_device_bytes'])} | {gib(r['peak_device_reserved_bytes'])} | {r['checks']['all_2_of_4']} |"
        )
    path = args.json or Path(os.environ.get("OUT", ".")) / "bench_sparsegpt_gpu.json"
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return 0 if all(r["checks"]["all_2_of_4"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
