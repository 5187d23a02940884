"""Engine benchmark: sequential (block-by-block onloading) vs whole-model mode.

A random-weight model with Llama-3-8B's published shape (hidden 4096, intermediate
14336, 32 layers, 32 heads, 8 kv heads, vocab 128256, rope_theta 500000, untied
embeddings) in bf16 is quantized with the ``rtn`` method (4 bits, symmetric, groups of
128, every Linear except lm_head) by ``compress.engine.run_stages``, once with
``run.mode: sequential`` and once with ``run.mode: whole``. For each mode the script
reports what ``run_stages`` records in ``report.phases["stages"]`` (wall time, peak GPU memory,
peak host memory, the moves of the whole model included), the stage's own time, and the
time before and after the stage inside ``run_stages`` (in whole mode: the move of the
model to the GPU and the copy back into its host tensors), from a plugin that observes
``compress_stage_start``/``compress_stage_end``. Each mode runs in its own subprocess,
so peak host memory is per mode. The quantized weights must equal a CPU-computed
reference bit for bit.

Usage (GPU)::

    python -m scripts.bench_engine                      # both modes, device cuda
    python -m scripts.bench_engine --tiny --device cpu  # a small model on the CPU (logic check)

Results are printed as a markdown table and written as JSON to ``--json`` or, when the
environment variable OUT is set, to ``$OUT/bench_engine.json``.

The script drives the engine on an in-memory model, without a recipe file or a loader:
``scripts.common`` builds the recipe, the planned stage (targets via
``compress.targets.match_modules``), the plugin host and the context.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.common import (
    StageClock,
    build_context,
    environment,
    gib,
    llama_config,
    plugin_host,
    random_model,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sequential", "whole")

SCHEME = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 128}


# --------------------------------------------------------------------------- engine


def warm_up(device: torch.device) -> None:
    """CUDA context and the quantization kernels, so neither mode pays for them in its timing."""
    if device.type != "cuda":
        return
    from compress.quant import QuantScheme, compute_grid

    weight = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    compute_grid(weight, QuantScheme(**SCHEME)).fake_quantize(weight).float().norm().item()
    del weight
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- checks


def snapshot(model, num_layers: int) -> dict:
    """Copies of a few weights taken before quantization, and where every parameter lives."""
    first, last = model.model.layers[0], model.model.layers[num_layers - 1]
    return {
        "weights": {
            "model.layers.0.self_attn.q_proj": first.self_attn.q_proj.weight.detach().clone(),
            f"model.layers.{num_layers - 1}.mlp.down_proj": last.mlp.down_proj.weight.detach().clone(),
            "lm_head[:256]": model.lm_head.weight[:256].detach().clone(),
            "embed_tokens[:256]": model.model.embed_tokens.weight[:256].detach().clone(),
        },
        "pointers": {name: p.data_ptr() for name, p in model.named_parameters()},
    }


def verify(context, before: dict, expected_layers: int) -> dict:
    """Correctness checks after a run (weights back on the host).

    Every parameter must be back on the host and, when the run used a GPU, in the host
    tensor it started in (the engine copies results back rather than allocating). A
    quantized layer's weights and the scales kept for the writer must equal, bit for bit,
    ``compute_grid`` and ``fake_quantize`` of the original computed on the CPU, whatever
    device ran. Weights that are not targeted (embeddings, lm_head) must be unchanged.
    """
    from compress.quant import QuantScheme, compute_grid

    model = context.model
    moved = context.device.type != "cpu"  # on the CPU nothing moves, and rtn replaces the tensors
    scheme = QuantScheme(**SCHEME)
    modules = dict(model.named_modules())
    checks: dict = {
        "all_on_host": all(p.device.type == "cpu" for p in model.parameters()),
        "host_tensors_kept": sum(p.data_ptr() == before["pointers"][n] for n, p in model.named_parameters()),
        "parameters": len(before["pointers"]),
        "layers_reported": len(context.report.stages[0].layers),
        "layers_expected": expected_layers,
    }
    ok = (
        checks["all_on_host"]
        and (checks["host_tensors_kept"] == checks["parameters"] or not moved)
        and checks["layers_reported"] == expected_layers
    )
    for name, original in before["weights"].items():
        if "[" in name:  # not targeted: must be untouched
            current = (model.lm_head.weight if name.startswith("lm_head") else model.model.embed_tokens.weight)[:256]
            checks[f"{name} unchanged"] = bool(torch.equal(current, original))
            ok = ok and checks[f"{name} unchanged"]
            continue
        weight = modules[name].weight.detach()
        reference = compute_grid(original, scheme, name)
        check = {
            "dtype": str(weight.dtype).removeprefix("torch."),
            "weight_mismatches_vs_cpu": int((weight != reference.fake_quantize(original)).sum()),
            "code_mismatches_vs_cpu": int((reference.quantize(weight) != reference.quantize(original)).sum()),
            "scale_mismatches_vs_cpu": int((context.layers[name].quant.scale != reference.scale).sum()),
            "scales": reference.scale.numel(),
        }
        checks[name] = check
        ok = ok and check["dtype"] == "bfloat16" and not any(v for k, v in check.items() if "mismatches" in k)
    checks["ok"] = bool(ok)
    return checks


# --------------------------------------------------------------------------- observer


# --------------------------------------------------------------------------- one mode


def run_mode(args) -> dict:
    from compress.engine import run_stages

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = args.child
    config = llama_config(args.tiny, args.layers)

    start = time.perf_counter()
    model = random_model(config, args.seed, args.threads)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"[{mode}] built {params / 1e9:.2f}B-parameter model in {build_seconds:.1f} s", flush=True)

    host = plugin_host("rtn")
    clock = StageClock(device)
    host.register(clock, name="bench-stage-clock")
    context, checked = build_context(host, model, config, mode, device, {"method": "rtn", **SCHEME})
    before = snapshot(model, config.num_hidden_layers)
    warm_up(device)

    begin = time.perf_counter()
    run_stages(context, checked)  # whole mode: moves the model to the device and back itself
    finish = time.perf_counter()
    totals = context.report.phases["stages"]
    record = context.report.stages[0]
    errors = [layer["relative_error"] for layer in record.layers.values()]
    to_device, to_host = clock.start - begin, finish - clock.end
    moves = mode == "whole" and device.type != "cpu"
    result = {
        "mode": mode,
        "device": str(device),
        "parameters": params,
        "model_bytes": model_bytes,
        "layers_quantized": len(record.layers),
        "build_seconds": build_seconds,
        "total_seconds": totals["seconds"],
        "stage_seconds": record.seconds,
        "outside_stage_seconds": totals["seconds"] - record.seconds,
        "before_stage_seconds": to_device,  # whole mode: the move to the device
        "after_stage_seconds": to_host,  # whole mode: the copy back into the host tensors
        "to_device_GBps": model_bytes / to_device / 1e9 if moves else None,
        "to_host_GBps": model_bytes / to_host / 1e9 if moves else None,
        "peak_device_bytes": totals["peak_device_bytes"],
        "stage_peak_device_bytes": record.peak_device_bytes,
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": totals["peak_host_bytes"],
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mean_relative_error": sum(errors) / len(errors),
        "blocks": clock.blocks(),
        "checks": verify(context, before, len(checked.stages[0].target_names)),
    }
    print(f"[{mode}] {json.dumps(result)}", flush=True)
    return result


# --------------------------------------------------------------------------- driver


def table(results: list[dict]) -> str:
    head = (
        "| mode | total (s) | move to GPU (s) | rtn stage (s) | move back to host (s) | peak GPU allocated (GiB) "
        "| peak GPU reserved (GiB) | peak host RSS in run (GiB) | process peak RSS (GiB) | per block (s) | layers | check |"
    )
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['total_seconds']:.2f} | {r['before_stage_seconds']:.2f} | {r['stage_seconds']:.2f} "
            f"| {r['after_stage_seconds']:.2f} | {gib(r['peak_device_bytes'])} | {gib(r['peak_device_reserved_bytes'])} "
            f"| {gib(r['peak_host_rss_bytes'])} | {gib(r['process_max_rss_bytes'])} "
            f"| {r['blocks'].get('mean_seconds', 0):.3f} | {r['layers_quantized']} "
            f"| {'ok' if r['checks']['ok'] else 'FAILED'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--modes", default="sequential,whole", help="comma-separated, run in this order")
    parser.add_argument("--tiny", action="store_true", help="a small Llama (hidden 256, 4 layers) for CPU checks")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None, help="results file (default $OUT/bench_engine.json)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_mode(args)
        args.result.write_text(json.dumps(result))
        return 0 if result["checks"]["ok"] else 1

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu)")
    env = environment(args.device)
    print(json.dumps(env), flush=True)

    results = []
    status = 0
    for mode in modes:
        with tempfile.TemporaryDirectory() as scratch:
            result_file = Path(scratch) / "result.json"
            command = [sys.executable, "-m", "scripts.bench_engine", "--child", mode, "--result", str(result_file)]
            command += ["--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
            command += ["--tiny"] if args.tiny else []
            command += ["--layers", str(args.layers)] if args.layers is not None else []
            code = subprocess.run(command, cwd=ROOT, check=False).returncode
            if not result_file.exists():
                print(f"{mode}: the child process failed (exit {code})", file=sys.stderr)
                return code or 1
            results.append(json.loads(result_file.read_text()))
            status = status or code

    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    layers = f", {args.layers} layers" if args.layers is not None else ""
    print(
        f"\nrtn W4 g128 symmetric, {shape}{layers}, {results[0]['parameters'] / 1e9:.2f}B parameters, bf16, "
        f"device {args.device}" + (f" ({env['gpu']})" if "gpu" in env else "")
    )
    print(table(results))
    for r in results:
        if r["to_device_GBps"]:
            print(
                f"{r['mode']}: {r['model_bytes'] / 1e9:.2f} GB moved to the GPU at {r['to_device_GBps']:.1f} GB/s, "
                f"back at {r['to_host_GBps']:.1f} GB/s"
            )
    if "sequential" in modes and args.device.startswith("cuda"):
        seq = next(r for r in results if r["mode"] == "sequential")
        target = seq["peak_device_bytes"] < 3 * 10**9
        print(
            f"\ntarget sequential peak GPU memory < 3 GB: {'met' if target else 'NOT met'} "
            f"({seq['peak_device_bytes'] / 1e9:.2f} GB)"
        )

    out = args.json or (Path(os.environ["OUT"]) / "bench_engine.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m scripts.bench_engine " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(
            json.dumps({"environment": env, "command": command.strip(), "results": results}, indent=2) + "\n"
        )
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
