"""GPTQ benchmark at Llama-3-8B shape: time per decoder layer and peak memory.

A random-weight model with Llama-3-8B's published shape (the model of
``scripts/bench_engine.py``: hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab
128256, untied embeddings, bf16, N(0, 0.02) weights) is quantized by the ``gptq`` method
(4 bits, symmetric, groups of 128, blocks of 128, 1% dampening, no activation ordering,
every Linear except lm_head) with ``run.mode: sequential`` (one decoder layer on the GPU
at a time) through ``compress.engine.run_stages``. Calibration data is 128 sequences of
2048 random token ids, injected directly into the context (``context._data``), so no
tokenizer or data file is needed. Random weights and random tokens give honest timings
(the work is the same dense arithmetic) but meaningless quality numbers.

Measured: total time and the stage's time (``report.totals``, ``report.stages[0]``), the
time of each decoder layer (a plugin observing ``compress_block_done``), split into
Hessian collection, the GPTQ solves and the rest (the forward pass producing the next
layer's inputs, moves), peak GPU memory (allocated, via ``report.totals``, and reserved),
peak host RSS. The run happens in a subprocess so peak host memory is its own.

Usage::

    python scripts/bench_gptq_gpu.py --layers 8          # GPU, 8 of the 32 layers
    python scripts/bench_gptq_gpu.py --tiny --device cpu # a small model on the CPU (logic check)

``--layers N`` builds a model with N decoder layers (default 32): every layer has the same
shape and the same work, so the time per layer of a shorter model is the time per layer
of the full one. Results go to ``--json`` or ``$OUT/bench_gptq_gpu.json``.
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

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "plugins", ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from compress import hookimpl  # noqa: E402
from bench_engine import StageClock, build_context, environment, gib, llama_config, random_model  # noqa: E402

PARAMS = dict(bits=4, group_size=128, symmetric=True)
FULL = dict(samples=128, seq_len=2048)
TINY = dict(samples=8, seq_len=128)


def plugin_host():
    from compress.host import PluginHost

    host = PluginHost()
    host.load_plugins()
    if "gptq" not in host.methods():  # no entry points without an installed distribution
        import compress_gptq

        host.register(compress_gptq, name="gptq")
    return host


def warm_up(device: torch.device) -> None:
    """CUDA context, cuBLAS and cuSOLVER handles, so the first layer does not pay for them."""
    if device.type != "cuda":
        return
    a = torch.randn(256, 256, device=device)
    h = a @ a.T + torch.eye(256, device=device)
    torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).sum().item()
    (a.bfloat16() @ a.bfloat16()).sum().item()
    del a, h
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


class Progress:
    """Prints each finished block, so a run cut short still shows its per-layer times."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock

    @hookimpl
    def compress_block_done(self, block_index: int, num_blocks: int) -> None:
        marks = self.clock.marks
        print(f"  layer {block_index + 1}/{num_blocks}: {marks[-1] - marks[-2]:.2f} s", flush=True)


def run_child(args) -> dict:
    from compress.engine import run_stages

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = llama_config(args.tiny, args.layers)
    data = TINY if args.tiny else FULL
    samples = args.samples or data["samples"]
    seq_len = args.seq_len or data["seq_len"]

    start = time.perf_counter()
    model = random_model(config, args.seed, args.threads)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f}B-parameter model ({config.num_hidden_layers} layers) in {build_seconds:.1f} s",
          flush=True)

    host = plugin_host()
    clock = StageClock(device)
    host.register(Progress(clock), name="bench-progress")
    host.register(clock, name="bench-stage-clock")  # pluggy calls the last registered first: clock marks, then Progress prints
    context, checked = build_context(host, model, config, "sequential", device, {"method": "gptq", **PARAMS})
    generator = torch.Generator().manual_seed(args.seed + 1)
    context._data["calibration"] = [
        torch.randint(0, config.vocab_size, (seq_len,), generator=generator) for _ in range(samples)
    ]
    names = checked.stages[0].target_names
    first, last = names[0], names[-1]
    modules = dict(model.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in (first, last)}
    warm_up(device)

    run_stages(context, checked)
    totals = context.report.totals
    record = context.report.stages[0]
    layers = record.layers

    # Per decoder layer: Hessian collection (once per block, repeated in each layer's report),
    # GPTQ solves (sum over the block's 7 Linear layers), the rest of the block's time.
    per_block = []
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    for index, total in enumerate(seconds):
        mine = [v for n, v in layers.items() if n.startswith(f"model.layers.{index}.")]
        hessian = mine[0]["hessian_seconds"] if mine else 0.0
        solve = sum(v["seconds"] for v in mine)
        rtn = sum(v["rtn_seconds"] for v in mine)
        per_block.append(dict(seconds=total, hessian=hessian, solve=solve, rtn_reference=rtn,
                              rest=total - hessian - solve - rtn))

    modules = dict(model.named_modules())
    checks: dict = {
        "all_on_host": all(p.device.type == "cpu" for p in model.parameters()),
        "layers_reported": len(layers),
        "layers_expected": len(names),
    }
    ok = checks["all_on_host"] and checks["layers_reported"] == checks["layers_expected"]
    for name in (first, last):
        weight = modules[name].weight.detach()
        grid = context.layers[name].quant
        check = {
            "finite": bool(torch.isfinite(weight).all()),
            "changed": bool(not torch.equal(weight, originals[name])),
            "off_grid": int((grid.fake_quantize(weight.float()).to(weight.dtype) != weight).sum()),
        }
        checks[name] = check
        ok = ok and check["finite"] and check["changed"] and check["off_grid"] == 0
    checks["ok"] = bool(ok)

    objective = [v["objective"] for v in layers.values()]
    rtn_objective = [v["rtn_objective"] for v in layers.values()]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    result = {
        "device": str(device),
        "parameters": params,
        "decoder_layers": config.num_hidden_layers,
        "linear_layers_quantized": len(layers),
        "calibration": {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len},
        "build_seconds": build_seconds,
        "total_seconds": totals["seconds"],
        "stage_seconds": record.seconds,
        "peak_device_bytes": totals["peak_device_bytes"],
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": totals["peak_host_bytes"],
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "blocks": clock.blocks(),
        "per_block": per_block,
                "mean_seconds": {k: mean([b[k] for b in per_block]) for k in ("seconds", "hessian", "solve", "rtn_reference", "rest")},
        "mean_objective": mean(objective),
        "mean_rtn_objective": mean(rtn_objective),
        "checks": checks,
    }
    print(json.dumps(result), flush=True)
    return result


def table(r: dict) -> str:
    m = r["mean_seconds"]
    head = (
        "| layers | calibration | total (s) | stage (s) | per layer, mean (s) | per layer, min (s) | Hessians (s) "
        "| GPTQ solves (s) | RTN reference (s) | forward + moves (s) | peak GPU allocated (GiB) "
        "| peak GPU reserved (GiB) | peak host RSS (GiB) | check |"
    )
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    c = r["calibration"]
    lines.append(
        f"| {r['decoder_layers']} | {c['samples']} × {c['seq_len']} | {r['total_seconds']:.1f} | {r['stage_seconds']:.1f} "
        f"| {m['seconds']:.2f} | {r['blocks'].get('min_seconds', 0):.2f} | {m['hessian']:.2f} | {m['solve']:.2f} "
        f"| {m['rtn_reference']:.2f} | {m['rest']:.2f} | {gib(r['peak_device_bytes'])} "
        f"| {gib(r['peak_device_reserved_bytes'])} | {gib(max(r['peak_host_rss_bytes'], r['process_max_rss_bytes']))} "
        f"| {'ok' if r['checks']['ok'] else 'FAILED'} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="a small Llama (hidden 256) and 8 × 128 tokens")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; tiny: 4)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None, help="results file (default $OUT/bench_gptq_gpu.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_child(args)
        args.result.write_text(json.dumps(result))
        return 0 if result["checks"]["ok"] else 1

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu)")
    env = environment(args.device)
    print(json.dumps(env), flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--result", str(result_file)]
        command += ["--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
        command += ["--tiny"] if args.tiny else []
        for flag, value in (("--layers", args.layers), ("--samples", args.samples), ("--seq-len", args.seq_len)):
            command += [flag, str(value)] if value is not None else []
        code = subprocess.run(command).returncode
        if not result_file.exists():
            print(f"the child process failed (exit {code})", file=sys.stderr)
            return code or 1
        result = json.loads(result_file.read_text())

    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    print(f"\ngptq W4 g128 symmetric, sequential, {shape}, {result['decoder_layers']} decoder layers, "
          f"{result['parameters'] / 1e9:.2f}B parameters, bf16, device {args.device}"
          + (f" ({env['gpu']})" if "gpu" in env else ""))
    print(table(result))
    b = result["blocks"]
    if b:
        print(f"per layer: mean {b['mean_seconds']:.2f} s, min {b['min_seconds']:.2f}, max {b['max_seconds']:.2f}, "
              f"first {b['first_seconds']:.2f}; 32 layers at the mean: {32 * b['mean_seconds']:.0f} s")
    print(f"mean relative output error (H-weighted): gptq {result['mean_objective']:.4f}, "
          f"rtn {result['mean_rtn_objective']:.4f}")
    if args.device.startswith("cuda"):
        peak = result["peak_device_bytes"]
        print(f"target peak GPU memory < 3 GB: {'met' if peak < 3 * 10**9 else 'NOT met'} ({peak / 1e9:.2f} GB); "
              f"floor ~1 s per layer: mean {b.get('mean_seconds', 0):.2f} s")

    out = args.json or (Path(os.environ["OUT"]) / "bench_gptq_gpu.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python scripts/bench_gptq_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(json.dumps({"environment": env, "command": command.strip(), "result": result}, indent=2) + "\n")
        print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
