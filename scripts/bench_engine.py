"""Engine benchmark: sequential (block-by-block onloading) vs whole-model mode.

A random-weight model with Llama-3-8B's published shape (hidden 4096, intermediate
14336, 32 layers, 32 heads, 8 kv heads, vocab 128256, rope_theta 500000, untied
embeddings) in bf16 is quantized with the ``rtn`` method (4 bits, symmetric, groups of
128, every Linear except lm_head) by ``compress.engine.run_stages``, once with
``run.mode: sequential`` and once with ``run.mode: whole``. For each mode the script
reports wall time, peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host
memory (resident set), and in whole mode the time to move the model to the GPU
(included in the total). Each mode runs in its own subprocess, so peak host memory is
per mode.

Usage (GPU)::

    python scripts/bench_engine.py                     # both modes, device cuda
    python scripts/bench_engine.py --tiny --device cpu # a small model on the CPU (logic check)

Results are printed as a markdown table and written as JSON to ``--json`` or, when the
environment variable OUT is set, to ``$OUT/bench_engine.json``.

The script drives the engine on an in-memory model, without a recipe file or a loader:
it builds the recipe, the planned stage (targets via ``compress.targets.match_modules``),
the plugin host and the context itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "plugins", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from compress import hookimpl  # noqa: E402

GIB = 2**30
MODES = ("sequential", "whole")

LLAMA_3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
SCHEME = dict(bits=4, symmetric=True, granularity="group", group_size=128)
CHUNK = 2**24  # elements filled per task when randomizing weights


# --------------------------------------------------------------------------- model


def llama_config(tiny: bool, layers: int | None):
    from transformers import LlamaConfig

    shape = dict(TINY if tiny else LLAMA_3_8B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    rope_theta = shape.pop("rope_theta")
    # transformers 5 keeps rope_theta inside rope_parameters; older versions take it directly.
    try:
        config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    except TypeError:
        config = LlamaConfig(**shape, rope_theta=rope_theta)
    found = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    if found != rope_theta:
        raise RuntimeError(f"config has rope_theta {found}, expected {rope_theta}")
    return config


def random_model(config, seed: int, threads: int):
    """LlamaForCausalLM on the host in bf16 with N(0, 0.02) weights, built without default init."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)  # still on meta: free
    model.to_empty(device="cpu")
    model.eval().requires_grad_(False)

    # Normal samples on the CPU are single-threaded inside torch; fill independent chunks
    # from a thread pool (torch releases the GIL), each with its own seeded generator.
    tasks = []
    for index, (name, param) in enumerate(model.named_parameters()):
        flat = param.data.view(-1)
        if name.endswith("norm.weight"):
            flat.fill_(1.0)
            continue
        for start in range(0, flat.numel(), CHUNK):
            tasks.append((seed * 1_000_003 + index * 65_537 + start // CHUNK, flat[start : start + CHUNK]))

    def fill(task):
        chunk_seed, chunk = task
        chunk.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(chunk_seed))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fill, tasks))

    # Non-persistent buffers (rotary inv_freq) are garbage after to_empty: rebuild them.
    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=config)
    return model


# --------------------------------------------------------------------------- engine


def plugin_host():
    from compress.host import PluginHost

    host = PluginHost()
    host.load_plugins()
    if "rtn" not in host.methods():  # no entry points without an installed distribution
        import compress_rtn

        host.register(compress_rtn, name="rtn")
    return host


def build_context(host, model, config, mode: str, device: torch.device):
    from compress.checkpoint import LoadedModel
    from compress.context import Context, Report, environment_info
    from compress.recipe import Recipe
    from compress.targets import match_modules
    from compress.validate import PlannedStage

    recipe = Recipe.model_validate(
        {
            "model": "random-llama-3-8b",
            "stages": [{"method": "rtn", **SCHEME}],
            "run": {"device": str(device), "mode": mode},
        }
    )
    method_class = host.methods()["rtn"]
    method = method_class(method_class.Params.model_validate(recipe.stages[0].params))
    targets, ignore = list(method.default_targets), list(method.default_ignore)  # Linear, minus lm_head
    selected, unmatched = match_modules(model, targets, ignore)
    assert not unmatched, unmatched
    for name, module in selected.items():
        method.check_layer(name, module)
    checked = SimpleNamespace(
        recipe=recipe, stages=[PlannedStage(method=method, targets=targets, ignore=ignore, target_names=list(selected))]
    )
    loaded = LoadedModel(model, None, config, "causal-lm", base_model="random-llama-3-8b")
    report = Report(
        model={
            "name": recipe.model.name,
            "base_model": loaded.base_model,
            "task": loaded.task,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "bfloat16",
        },
        environment=environment_info(device),
    )
    context = Context(host, recipe, loaded, None, device, report)
    assert context.sequential == (mode == "sequential")
    return context, checked


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


def snapshot(model, num_layers: int) -> dict[str, torch.Tensor]:
    """Copies of a few weights taken before quantization, for the checks afterwards."""
    layers = model.model.layers
    return {
        "model.layers.0.self_attn.q_proj": layers[0].self_attn.q_proj.weight.detach().clone(),
        f"model.layers.{num_layers - 1}.mlp.down_proj": layers[num_layers - 1].mlp.down_proj.weight.detach().clone(),
        "lm_head[:256]": model.lm_head.weight[:256].detach().clone(),
        "embed_tokens[:256]": model.model.embed_tokens.weight[:256].detach().clone(),
    }


def codes_against_cpu_reference(weight: torch.Tensor, original: torch.Tensor, scheme) -> dict:
    """How the run's weights differ from a fake-quant of the original computed on the CPU.

    CUDA computes ``tensor / python_scalar`` as ``tensor * (1 / scalar)`` (PyTorch's
    div_true_kernel_cuda), so a scale can differ from the CPU's by one ulp; with bf16
    weights many quotients ``w / scale`` are exact ties (k + 0.5), and such a tie may
    then round the other way. Any difference must be one code step at a near-tie.
    """
    from compress.quant import compute_grid

    grid = compute_grid(original, scheme)
    scale = grid.scale.unsqueeze(-1)
    quotient = original.float().unflatten(1, (-1, scheme.group_size)) / scale
    expected = grid.quantize(original).unflatten(1, (-1, scheme.group_size)).int()
    found = (weight.float().unflatten(1, (-1, scheme.group_size)) / scale).round().clamp(scheme.qmin, scheme.qmax).int()
    differ = found != expected
    near_tie = ((quotient.abs() - quotient.abs().floor()) - 0.5).abs() < 1e-5
    return {
        "mismatches": int(differ.sum()),
        "max_code_difference": int((found - expected).abs().max()),
        "all_mismatches_at_near_ties": bool((differ <= near_tie).all()),
    }


def verify(model, before: dict[str, torch.Tensor], record, expected_layers: int, device: torch.device) -> dict:
    """Cheap correctness checks after a run (weights back on the host).

    A quantized layer must equal ``compute_grid(...).fake_quantize`` of its original
    computed on the run's device (bit for bit), hold at most 2**bits distinct values in
    each group, and differ from a CPU-computed reference only by one-step ties.
    Untargeted weights (embeddings, lm_head) must be unchanged.
    """
    from compress.quant import QuantScheme, compute_grid

    scheme = QuantScheme(**SCHEME)
    modules = dict(model.named_modules())
    checks: dict = {}
    checks["all_on_host"] = all(p.device.type == "cpu" for p in model.parameters())
    checks["layers_reported"] = len(record.layers)
    checks["layers_expected"] = expected_layers
    ok = checks["all_on_host"] and checks["layers_reported"] == expected_layers
    for name, original in before.items():
        if "[" in name:  # not targeted: must be untouched
            current = (model.lm_head.weight if name.startswith("lm_head") else model.model.embed_tokens.weight)[:256]
            checks[f"{name} unchanged"] = bool(torch.equal(current, original))
            ok = ok and checks[f"{name} unchanged"]
            continue
        weight = modules[name].weight.detach()
        on_device = original.to(device)
        expected = compute_grid(on_device, scheme, name).fake_quantize(on_device).cpu()
        groups = weight.float().unflatten(1, (-1, scheme.group_size)).sort(-1).values
        distinct = int(((groups.diff(dim=-1) != 0).sum(-1) + 1).max())
        check = {
            "dtype": str(weight.dtype).removeprefix("torch."),
            "changed": not torch.equal(weight, original),
            "mismatches_vs_same_device_fake_quant": int((weight != expected).sum()),
            "max_distinct_values_per_group": distinct,
            "vs_cpu_reference": codes_against_cpu_reference(weight, original, scheme),
        }
        checks[name] = check
        cpu = check["vs_cpu_reference"]
        ok = (
            ok
            and check["changed"]
            and check["dtype"] == "bfloat16"
            and check["mismatches_vs_same_device_fake_quant"] == 0
            and distinct <= 2**scheme.bits
            and cpu["max_code_difference"] <= 1
            and cpu["all_mismatches_at_near_ties"]
        )
    if device.type == "cuda":
        checks["scale_division"] = scale_division_probe(next(iter(before.values())), scheme, device)
    checks["ok"] = bool(ok)
    return checks


def scale_division_probe(original: torch.Tensor, scheme, device: torch.device) -> dict:
    """Whether symmetric scales computed on the GPU equal the CPU's, as compute_grid does it
    (dividing by a Python scalar) and with the divisor as a tensor on the device."""
    from compress.quant import compute_grid

    cpu = compute_grid(original, scheme).scale
    gpu = compute_grid(original.to(device), scheme).scale.cpu()
    absmax = original.to(device).float().unflatten(1, (-1, scheme.group_size)).abs().amax(-1)
    divisor = torch.tensor((scheme.qmax - scheme.qmin) / 2, dtype=torch.float32, device=device)
    tensor_divisor = (absmax / divisor).cpu()
    return {
        "scales": cpu.numel(),
        "gpu_scalar_divisor_equal_to_cpu": int((gpu == cpu).sum()),
        "gpu_tensor_divisor_equal_to_cpu": int((tensor_divisor == cpu).sum()),
    }


# --------------------------------------------------------------------------- observers


class BlockTimer:
    """A plugin that timestamps each block of the stage (compress_block_done)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    @hookimpl
    def compress_stage_start(self) -> None:
        self.marks = [time.perf_counter()]

    @hookimpl
    def compress_block_done(self, block_index: int) -> None:
        self.marks.append(time.perf_counter())

    def summary(self) -> dict:
        seconds = [b - a for a, b in zip(self.marks, self.marks[1:])]
        if not seconds:
            return {}
        return {
            "blocks": len(seconds),
            "sum_seconds": sum(seconds),
            "mean_seconds": sum(seconds) / len(seconds),
            "min_seconds": min(seconds),
            "max_seconds": max(seconds),
            "first_seconds": seconds[0],
        }


def transfer_probe(model, device: torch.device) -> dict:
    """Host<->GPU copy rates for one block's worth of bf16, after the measured run.

    block_*: what the engine does (Module.to, pageable memory; moving back allocates
    fresh host memory). flat_*: one tensor of the same size, pageable (already touched),
    fresh and pinned host memory.
    """
    if device.type != "cuda":
        return {}
    block = model.model.layers[0]
    size = sum(p.numel() * p.element_size() for p in block.parameters())
    result: dict = {"bytes": size}

    def timed(fn) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def rate(seconds: float) -> float:
        return size / seconds / 1e9

    for attempt in range(2):  # the second of two is reported
        result["block_h2d_GBps"] = rate(timed(lambda: block.to(device)))
        result["block_d2h_GBps"] = rate(timed(lambda: block.to("cpu")))
    numel = size // 2
    host = torch.empty(numel, dtype=torch.bfloat16).fill_(1)
    gpu = torch.empty(numel, dtype=torch.bfloat16, device=device)
    for attempt in range(2):
        result["flat_pageable_h2d_GBps"] = rate(timed(lambda: gpu.copy_(host)))
        result["flat_pageable_d2h_touched_GBps"] = rate(timed(lambda: host.copy_(gpu)))
        result["flat_d2h_fresh_GBps"] = rate(timed(lambda: gpu.to("cpu")))
    try:
        pinned = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True).fill_(1)
        for attempt in range(2):
            result["flat_pinned_h2d_GBps"] = rate(timed(lambda: gpu.copy_(pinned, non_blocking=True)))
            result["flat_pinned_d2h_GBps"] = rate(timed(lambda: pinned.copy_(gpu, non_blocking=True)))
    except RuntimeError as error:
        result["pinned_error"] = str(error)
    return result


# --------------------------------------------------------------------------- one mode


def run_mode(args) -> dict:
    from compress.engine import run_stages
    from compress.resources import measure

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = args.child
    config = llama_config(args.tiny, args.layers)

    start = time.perf_counter()
    model = random_model(config, args.seed, args.threads)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"[{mode}] built {params / 1e9:.2f}B-parameter model in {build_seconds:.1f} s", flush=True)

    host = plugin_host()
    timer = BlockTimer()
    host.register(timer, name="bench-block-timer")
    context, checked = build_context(host, model, config, mode, device)
    before = snapshot(model, config.num_hidden_layers)
    warm_up(device)

    move_seconds = 0.0
    peak_after_move = 0
    with measure(device) as usage:
        if mode == "whole":
            # run_stages would do exactly this itself; done here so it can be timed alone
            # (run_stages' own .to(device) is then a no-op).
            move_start = time.perf_counter()
            context.model.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak_after_move = torch.cuda.max_memory_allocated(device)
            move_seconds = time.perf_counter() - move_start
        run_stages(context, checked)
    record = context.report.stages[0]
    # The stage's own measure() resets the peak counter when it starts; a peak reached
    # before that (the move in whole mode) is taken separately.
    peak_device = max(usage.peak_device_bytes, peak_after_move)
    peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    errors = [layer["relative_error"] for layer in record.layers.values()]

    checks = verify(model, before, record, len(checked.stages[0].target_names), device)
    try:
        transfers = transfer_probe(model, device) if mode == "sequential" else {}
    except Exception as error:  # a probe must not lose the measured results
        transfers = {"error": f"{type(error).__name__}: {error}"}
    result = {
        "mode": mode,
        "device": str(device),
        "parameters": params,
        "layers_quantized": len(record.layers),
        "build_seconds": build_seconds,
        "total_seconds": usage.seconds,
        "move_to_device_seconds": move_seconds,
        "stage_seconds": record.seconds,
        "after_stage_seconds": usage.seconds - move_seconds - record.seconds,
        "peak_device_bytes": peak_device,
        "stage_peak_device_bytes": record.peak_device_bytes,
        "peak_device_reserved_bytes": peak_reserved,
        "peak_host_rss_bytes": usage.peak_host_bytes,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mean_relative_error": sum(errors) / len(errors),
        "blocks": timer.summary(),
        "transfers": transfers,
        "checks": checks,
    }
    print(f"[{mode}] {json.dumps({k: v for k, v in result.items() if k not in ('checks', 'transfers')})}", flush=True)
    print(f"[{mode}] transfers: {json.dumps(transfers)}", flush=True)
    print(f"[{mode}] checks: {json.dumps(checks)}", flush=True)
    return result


# --------------------------------------------------------------------------- driver


def environment(device: str) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def table(results: list[dict]) -> str:
    head = (
        "| mode | total (s) | move to GPU (s) | rtn stage (s) | move back to host (s) | peak GPU allocated (GiB) "
        "| peak GPU reserved (GiB) | peak host RSS in run (GiB) | process peak RSS (GiB) | per block (s) | layers | check |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in results:
        move = f"{r['move_to_device_seconds']:.2f}" if r["mode"] == "whole" else "-"
        lines.append(
            f"| {r['mode']} | {r['total_seconds']:.2f} | {move} | {r['stage_seconds']:.2f} "
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
            command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--result", str(result_file)]
            command += ["--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
            command += ["--tiny"] if args.tiny else []
            command += ["--layers", str(args.layers)] if args.layers is not None else []
            code = subprocess.run(command).returncode
            if not result_file.exists():
                print(f"{mode}: the child process failed (exit {code})", file=sys.stderr)
                return code or 1
            results.append(json.loads(result_file.read_text()))
            status = status or code

    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    layers = f", {args.layers} layers" if args.layers is not None else ""
    print(f"\nrtn W4 g128 symmetric, {shape}{layers}, {results[0]['parameters'] / 1e9:.2f}B parameters, bf16, "
          f"device {args.device}" + (f" ({env['gpu']})" if "gpu" in env else ""))
    print(table(results))
    for r in results:
        if r.get("transfers"):
            print(f"\n{r['mode']}: host<->GPU copies of one block: {json.dumps(r['transfers'])}")
    if "sequential" in modes and args.device.startswith("cuda"):
        seq = next(r for r in results if r["mode"] == "sequential")
        target = seq["peak_device_bytes"] < 3 * 10**9
        print(f"\ntarget sequential peak GPU memory < 3 GB: {'met' if target else 'NOT met'} "
              f"({seq['peak_device_bytes'] / 1e9:.2f} GB)")

    out = args.json or (Path(os.environ["OUT"]) / "bench_engine.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python scripts/bench_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(json.dumps({"environment": env, "command": command.strip(), "results": results}, indent=2) + "\n")
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
