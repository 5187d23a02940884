"""GPTQ benchmark at Llama-3-8B shape: time per decoder layer and peak GPU memory, ours and
LLM Compressor's, on the same random model and the same calibration tokens.

A random-weight model with Llama-3-8B's published shape (the model of
``scripts.common``: hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab
128256, untied embeddings, bf16, N(0, 0.02) weights) is quantized by the ``gptq`` method
(4 bits, symmetric, groups of 128, blocks of 128, 1% dampening, activation ordering off
unless ``--act-order``, every Linear except lm_head) with ``run.mode: sequential`` (one decoder layer on the GPU
at a time) through ``compress.engine.run_stages``. Calibration data is 128 sequences of
2048 random token ids, injected directly into the context (``context._data``), so no
tokenizer or data file is needed. Random weights and random tokens give honest timings
(the work is the same dense arithmetic) but meaningless quality numbers.

Measured for ours: the time of each decoder layer (a plugin observing
``compress_block_done``), split with the method's per-layer report into Hessian
collection (the first forward pass and the X Xᵀ products), the GPTQ solves, the report's
round-to-nearest baseline, and the rest (the second forward pass producing the next
layer's inputs, host↔GPU moves); peak GPU memory (allocated and reserved); peak host RSS;
which column-loop path ran (``triton``: the fused kernel, ``cuda graph``, ``eager``); checks
that the CUDA-graph and fused column loops give exactly the eager loop's result on test
layers (symmetric, asymmetric, inherited grid with frozen outliers), and that bf16 Hessian
products (``low_precision_products``) match the float32 ones to accumulation rounding.

When ``llmcompressor`` is importable, LLM Compressor's ``GPTQModifier`` (the same
settings: W4 g128 symmetric, block 128, dampening 0.01, ``actorder`` given explicitly as
None, or ``"static"`` with ``--act-order``, since the modifier's own default is
``"static"``; ignore lm_head) runs in the same
invocation through its ``sequential`` pipeline on the same random model (same seed) and
the same calibration tensors, fed as a DataLoader to the pipeline ``oneshot`` would use
(``Oneshot.apply_recipe_modifiers``; model loading and the dataset pre-processing are
skipped, as the data is already token ids). Its time per decoder layer comes from the
moments each decoder layer is first called. llmcompressor imports ``datasets`` for type
hints only; where ``datasets`` is missing a stand-in module is registered so the import
succeeds (no dataset code runs here). Each run records the settings it ran with (for LLM
Compressor read back from a quantized layer's scheme after the run), printed before the
table and in its ``settings`` column. Each run is a subprocess of its own, so peak
memories are its own.

Usage (GPU, after ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl .whl-lc/*.whl``)::

    PYTHONPATH=/tmp/site:.:plugins python -m scripts.bench_gptq_gpu --layers 4
    python -m scripts.bench_gptq_gpu --tiny --device cpu   # a small model on the CPU (logic check)

``--unfused`` (no fused Triton column loop), ``--eager`` (no CUDA graphs),
``--fp32-products`` (Hessian products through float32 copies and TF32) and ``--old-paths``
(session 6's Cholesky-inverse-Cholesky factor and full Hessian products instead of the
reversed-Cholesky factor and upper-triangle products) select the slower paths of ours, for
comparison; ``--no-overlap`` runs ours with ``overlap: false`` (the solves of a block one after
another, each block moved to the GPU when it starts and back when it ends, as before session 8).
``--compare`` runs ours as the flags say, then without the RTN reference and with expandable
segments on the old paths without overlap, on the current paths without overlap and with it,
then LLM Compressor, in one invocation, and says whether the runs without and with overlap
quantized to bit-identical weights (a SHA-256 of every quantized weight, ``weights_sha256``).
``--profile`` adds a run of ours with ``torch.profiler`` over layer 2 (its top operations
printed and saved; ``--trace FILE`` writes its timeline as a Chrome trace). The checks also time both factor routes on random
Hessians 4096 and 14336 wide (``factor_seconds``) and compare them and the triangle
Hessian products with the reference paths. The command for one H100::

    PYTHONPATH=/tmp/site:.:plugins python -m scripts.bench_gptq_gpu --layers 4 --compare \
        --json $OUT/bench_gptq_gpu_compare.json

``--layers N`` builds a model with N decoder layers (default 4): every layer has the same
shape and the same work, so the time per layer of a shorter model is the time per layer
of the full one; the median over the layers is reported. Results go to ``--json`` or
``$OUT/bench_gptq_gpu.json``.
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
import time
import types
from pathlib import Path

import torch

from compress import hookimpl
from scripts.common import (
    StageClock,
    build_context,
    environment,
    gib,
    llama_config,
    plugin_host,
    random_model,
    save_results,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"bits": 4, "group_size": 128, "symmetric": True, "block_size": 128, "percdamp": 0.01}
"""The settings both tools run with; activation ordering is off unless ``--act-order``."""
FULL = {"samples": 128, "seq_len": 2048}
TINY = {"samples": 8, "seq_len": 128}


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


class BlockProfile:
    """``torch.profiler`` over one decoder layer (from the end of the one before to its own end):
    the operations and kernels taking the most device (on the CPU: host) time, in ``rows``."""

    def __init__(self, device: torch.device, block_index: int, top: int = 30, trace: Path | None = None) -> None:
        self.device, self.block_index, self.top, self.trace = device, block_index, top, trace
        self.profiler = None
        self.rows: list[dict] = []

    @hookimpl
    def compress_block_done(self, block_index: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if block_index == self.block_index - 1:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif block_index == self.block_index and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            if self.trace is not None:
                self.profiler.export_chrome_trace(str(self.trace))
            key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            events = sorted(self.profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
            self.rows = [
                {
                    "name": event.key[:120],
                    "calls": event.count,
                    "self_device_ms": round(event.self_device_time_total / 1e3, 3),
                    "self_host_ms": round(event.self_cpu_time_total / 1e3, 3),
                }
                for event in events[: self.top]
            ]
            self.profiler = None


def calibration(args, config) -> list[torch.Tensor]:
    """The calibration token ids, the same for both runs (seeded)."""
    data = TINY if args.tiny else FULL
    samples, seq_len = args.samples or data["samples"], args.seq_len or data["seq_len"]
    generator = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, config.vocab_size, (seq_len,), generator=generator) for _ in range(samples)]


def build(args):
    torch.set_num_threads(args.threads)
    config = llama_config(args.tiny, args.layers)
    start = time.perf_counter()
    model = random_model(config, args.seed, args.threads)
    build_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(
        f"built {params / 1e9:.2f}B-parameter model ({config.num_hidden_layers} layers) in {build_seconds:.1f} s",
        flush=True,
    )
    return config, model, build_seconds, params


def graph_check(device: torch.device) -> dict:
    """The column loop replayed from CUDA graphs, and the fused one, give exactly the eager
    loop's result; bf16 Hessian products give the float32 ones to accumulation rounding."""
    if device.type != "cuda":
        return {"cuda_graphs": "not used (cpu)"}
    from compress.quant import QuantScheme, compute_grid
    from compress_gptq.solve import KernelCache, gptq_quantize

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 512, generator=generator)
    weight = torch.randn(400, 512, generator=generator).to(device)  # 400 rows: a partial slab of the fused kernel
    hessian = (2 / 4096 * x.T @ x).to(device)
    inherited = QuantScheme(bits=3, group_size=64)
    grid = compute_grid(weight * 0.9, inherited)
    mask = weight.abs() > weight.abs().quantile(0.95)
    frozen = {
        "grid": grid,
        "frozen": mask,
        "frozen_values": torch.where(mask, weight.round(decimals=2), grid.fake_quantize(weight)),
    }
    cases = {
        "g128": (QuantScheme(bits=4, group_size=128), {}),
        "g64-asym": (QuantScheme(bits=3, group_size=64, symmetric=False), {}),
        "channel-asym": (QuantScheme(bits=4, symmetric=False, granularity="channel"), {}),
        "inherited-frozen": (inherited, frozen),
    }
    graphs, fused, loops = {}, {}, set()
    for label, (scheme, options) in cases.items():
        eager = gptq_quantize(weight, hessian, scheme, **options, kernels=KernelCache(cuda_graphs=False))
        graphed = gptq_quantize(weight, hessian, scheme, **options, kernels=KernelCache(cuda_graphs=True))
        fast = gptq_quantize(weight, hessian, scheme, **options, kernels=KernelCache(cuda_graphs=True, fused=True))
        graphs[label] = bool(torch.equal(eager.weight, graphed.weight))
        fused[label] = bool(torch.equal(eager.weight, fast.weight) and torch.equal(eager.row_errors, fast.row_errors))
        loops.add(fast.column_loop)
    return {
        "cuda_graphs_equal_eager": graphs,
        "fused_equal_eager": fused,
        "fused_check_loop": sorted(loops),
        **hessian_check(device),
        **factor_check(device),
    }


def hessian_check(device: torch.device) -> dict:
    """Largest differences, relative to the largest entry, from the full float32-product Hessian
    of a 2560-wide input: of the bf16-product one and of the upper-triangle one (bands of
    ``TRIANGLE_ROWS``, mirrored), as the method collects them on CUDA; and the relative
    difference of ``tr(W H Wᵀ)`` (a bf16-valued W) in TF32, as the report computes it."""
    from compress.hessian import collect_hessians

    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(2560, 256).to(device, torch.bfloat16)
    inputs = [((torch.randn(1, 2048, 2560, generator=generator).to(device, torch.bfloat16),), {}) for _ in range(3)]
    plain, _ = collect_hessians(layer, {"l": layer}, inputs, device, triangle=False)
    reference = plain["l"].matrix
    differences = {}
    for label, options in (("bf16", {"low_precision": True, "triangle": False}), ("triangle", {"triangle": True})):
        other, _ = collect_hessians(layer, {"l": layer}, inputs, device, **options)
        differences[label] = ((reference - other["l"].matrix).abs().max() / reference.abs().max()).item()
    from compress.hessian import h_norms

    weight = torch.randn(512, 2560, generator=generator).to(device, torch.bfloat16).float() * 0.02
    exact, fast = h_norms(reference, weight)[0], h_norms(reference, weight, tf32=True)[0]
    return {
        "bf16_hessian_relative_difference": differences["bf16"],
        "triangle_hessian_relative_difference": differences["triangle"],
        "tf32_norm_relative_difference": abs(fast - exact) / exact,
    }


def factor_check(device: torch.device, widths: tuple[int, ...] = (4096, 14336)) -> dict:
    """The two routes of ``inverse_factor`` on random Hessians of the widths of a Llama-3-8B
    block (4096, 14336): seconds (the faster of two calls) and the largest difference of their
    factors relative to the largest entry (same matrix, other rounding)."""
    from compress.hessian import FACTOR_ROUTES, inverse_factor

    generator = torch.Generator(device=device).manual_seed(2)
    seconds: dict = {route: {} for route in FACTOR_ROUTES}
    difference = {}
    for width in widths:
        x = torch.randn(width + 256, width, generator=generator, device=device)
        H = x.T @ x / x.shape[0]
        del x
        uppers = {}
        for route in FACTOR_ROUTES:
            times = []
            for _ in range(2):
                torch.cuda.synchronize(device)
                started = time.perf_counter()
                uppers[route] = inverse_factor(H, 0.01, False, route=route).upper
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
            seconds[route][str(width)] = round(min(times), 4)
        a, b = (uppers[route] for route in FACTOR_ROUTES)
        difference[str(width)] = ((a - b).abs().max() / a.abs().max()).item()
        del H, uppers, a, b
    torch.cuda.empty_cache()
    return {"factor_seconds": seconds, "factor_route_relative_difference": difference}


def ours_settings(params) -> dict:
    """The settings our gptq stage ran with, in the same keys as LLM Compressor's record."""
    return {
        "bits": params.bits,
        "symmetric": params.symmetric,
        "group_size": params.group_size,
        # act_order with groups is static groups: every group's grid computed up front
        "act_order": "static" if params.act_order else "off",
        "block_size": params.block_size,
        "dampening": params.percdamp,
    }


def describe(settings: dict) -> str:
    """One line: the weight grid, activation ordering, block size and dampening of a run."""
    groups = f"groups of {settings['group_size']}" if settings["group_size"] else "per channel"
    kind = "symmetric" if settings["symmetric"] else "asymmetric"
    return (
        f"W{settings['bits']} {kind}, {groups}, act-order {settings['act_order']}, "
        f"block {settings['block_size']}, dampening {settings['dampening']}"
    )


def run_ours(args) -> dict:
    from compress.engine import run_stages

    device = torch.device(args.device)
    if args.old_paths:
        import compress.hessian

        compress.hessian.CUDA_FACTOR_ROUTE, compress.hessian.CUDA_TRIANGLE = "inverse", False
    config, model, build_seconds, params = build(args)
    host = plugin_host("gptq")
    clock = StageClock(device)
    profiler = BlockProfile(device, 1, trace=args.trace) if args.profile else None
    if profiler is not None:
        host.register(profiler, name="bench-profile")
    host.register(Progress(clock), name="bench-progress")
    host.register(
        clock, name="bench-stage-clock"
    )  # pluggy calls the last registered first: clock marks, then Progress prints
    stage = {
        "method": "gptq",
        **SETTINGS,
        "act_order": args.act_order,
        "cuda_graphs": not args.eager,
        "fused_column_loop": not args.unfused,
        "low_precision_products": not args.fp32_products,
        "rtn_reference": not args.no_rtn_reference,
        "overlap": not args.no_overlap,
    }
    context, checked = build_context(host, model, config, "sequential", device, stage)
    samples = calibration(args, config)
    context._data["calibration"] = [{"input_ids": ids, "labels": ids} for ids in samples]  # compress.data.Sample
    names = checked.stages[0].target_names
    first, last = names[0], names[-1]
    modules = dict(model.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in (first, last)}
    warm_up(device)
    graphs = graph_check(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    run_stages(context, checked)
    totals = context.report.phases["stages"]
    record = context.report.stages[0]
    layers = record.layers

    # Per decoder layer: Hessian collection (once per block, repeated in each layer's report),
    # GPTQ solves (each layer reports its row share of its joint solve), the RTN baseline, the rest.
    per_block = []
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    for index, total in enumerate(seconds):
        mine = [v for n, v in layers.items() if n.startswith(f"model.layers.{index}.")]
        hessian = mine[0]["hessian_seconds"] if mine else 0.0
        solve = sum(v["seconds"] for v in mine)
        rtn = sum(v["rtn_seconds"] for v in mine)
        per_block.append(
            {
                "seconds": total,
                "hessian": hessian,
                "solve": solve,
                "rtn_reference": rtn,
                "rest": total - hessian - solve - rtn,
            }
        )

    checks: dict = {
        "all_on_host": all(p.device.type == "cpu" for p in model.parameters()),
        "layers_reported": len(layers),
        "layers_expected": len(names),
        "column_loop": sorted({v["column_loop"] for v in layers.values()}),
        **graphs,
    }
    ok = checks["all_on_host"] and checks["layers_reported"] == checks["layers_expected"]
    ok = ok and all(graphs.get("cuda_graphs_equal_eager", {}).values())
    ok = ok and all(graphs.get("fused_equal_eager", {}).values())
    # the two differ only in the order of fp32 summation (bf16 products are exact either way): about
    # sqrt(6144) x 2^-24 per entry, whose maximum over 1M entries is a few 1e-5; a wrong product is O(1)
    ok = ok and graphs.get("bf16_hessian_relative_difference", 0.0) < 1e-4
    ok = ok and graphs.get("triangle_hessian_relative_difference", 0.0) < 1e-4
    ok = ok and graphs.get("tf32_norm_relative_difference", 0.0) < 1e-3  # report-only figures
    ok = ok and all(d < 1e-4 for d in graphs.get("factor_route_relative_difference", {}).values())
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

    checks["weights_sha256"] = weights_digest(model, names)
    objective = [v["objective"] for v in layers.values()]
    rtn_objective = [v["rtn_objective"] for v in layers.values() if v["rtn_objective"] is not None]
    result = {
        "run": "compress gptq"
        + "".join(
            f" ({label})"
            for flag, label in (
                (args.eager, "no CUDA graphs"),
                (args.unfused, "unfused column loop"),
                (args.fp32_products, "float32 Hessian products"),
                (args.no_rtn_reference, "no RTN reference"),
                (args.expandable_segments, "expandable segments"),
                (args.old_paths, "session-6 factor and Hessian products"),
                (args.no_overlap, "no overlap"),
                (args.profile, "profiled layer 2"),
            )
            if flag
        ),
        "device": str(device),
        "parameters": params,
        "decoder_layers": config.num_hidden_layers,
        "linear_layers_quantized": len(layers),
        "settings": ours_settings(checked.stages[0].method.params),
        "calibration": {"samples": len(samples), "seq_len": len(samples[0])},
        "build_seconds": build_seconds,
        "stage_seconds": record.seconds,
        "peak_device_bytes": totals["peak_device_bytes"],
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": max(
            totals["peak_host_bytes"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ),
        "layer_seconds": seconds,
        "per_block": per_block,
        "median_seconds": {k: statistics.median(b[k] for b in per_block) for k in per_block[0]},
        "mean_objective": statistics.fmean(objective),
        "mean_rtn_objective": statistics.fmean(rtn_objective) if rtn_objective else None,
        "checks": checks,
    }
    if profiler is not None:
        result["profile"] = profiler.rows
    print(json.dumps(result), flush=True)
    return result


def weights_digest(model: torch.nn.Module, names: list[str]) -> str:
    """SHA-256 of the quantized layers' weights, in target order: equal digests, bit-identical results."""
    import hashlib

    digest = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight.detach().cpu().contiguous()
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def datasets_stand_in() -> None:
    """Register a minimal ``datasets`` module when the real one is missing.

    llmcompressor imports ``datasets`` (Dataset, DatasetDict, IterableDataset, load_dataset,
    LazyRow) at import time for type hints and its own data loading, which this benchmark
    does not use: it hands the pipeline a DataLoader of token ids. The real package needs
    pyarrow and pandas (about 60 MB of wheels); the stand-in raises if anything calls it.
    """
    if importlib.util.find_spec("datasets") is not None:
        return

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("datasets is not installed; the benchmark's stand-in only satisfies imports")

    root = types.ModuleType("datasets")
    root.__path__ = []
    for name in ("Dataset", "DatasetDict", "IterableDataset"):
        setattr(root, name, type(name, (), {"__init__": unavailable}))
    root.load_dataset = unavailable
    formatting = types.ModuleType("datasets.formatting")
    formatting.__path__ = []
    inner = types.ModuleType("datasets.formatting.formatting")
    inner.LazyRow = type("LazyRow", (dict,), {})
    root.formatting, formatting.formatting = formatting, inner
    sys.modules.update({"datasets": root, "datasets.formatting": formatting, "datasets.formatting.formatting": inner})


def run_modifier(model: torch.nn.Module, modifier, loader, device: torch.device) -> tuple[list[float], float]:
    """Run one LLM Compressor modifier through its sequential pipeline, as ``oneshot()`` does minus
    loading a model from a path and tokenizing a dataset: seconds per decoder layer, and in all."""
    from llmcompressor.args import DatasetArguments, RecipeArguments
    from llmcompressor.entrypoints.oneshot import Oneshot

    shot = Oneshot.__new__(Oneshot)
    shot.model = model
    shot.recipe = [modifier]
    shot.recipe_args = RecipeArguments(recipe=[modifier])
    shot.dataset_args = DatasetArguments(pipeline="sequential")
    starts: dict[int, float] = {}

    def first_call(index: int):
        def hook(_module, _args):
            if index not in starts:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                starts[index] = time.perf_counter()

        return hook

    handles = [layer.register_forward_pre_hook(first_call(i)) for i, layer in enumerate(model.model.layers)]
    warm_up(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    shot.apply_recipe_modifiers(calibration_dataloader=loader)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ended = time.perf_counter()
    for handle in handles:
        handle.remove()
    marks = [starts[i] for i in sorted(starts)] + [ended]
    return [b - a for a, b in itertools.pairwise(marks)], ended - started


def run_llmcompressor(args) -> dict:
    datasets_stand_in()
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier
    from torch.utils.data import DataLoader

    device = torch.device(args.device)
    config, model, build_seconds, params = build(args)
    samples = calibration(args, config)
    loader = DataLoader(samples, batch_size=1, collate_fn=lambda batch: {"input_ids": torch.stack(batch)})
    weights = QuantizationArgs(
        num_bits=SETTINGS["bits"],
        type="int",
        symmetric=SETTINGS["symmetric"],
        strategy="group",
        group_size=SETTINGS["group_size"],
    )
    # GPTQModifier's own default is actorder "static": it is always given explicitly here
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=SETTINGS["block_size"],
        dampening_frac=SETTINGS["percdamp"],
        actorder="static" if args.act_order else None,
    )
    seconds, stage_seconds = run_modifier(model, modifier, loader, device)
    quantized = [m for m in model.modules() if hasattr(m, "weight_scale")]
    expected = 7 * config.num_hidden_layers
    applied = quantized[0].quantization_scheme.weights  # the settings after the modifier resolved them
    actorder = getattr(applied.actorder, "value", applied.actorder)
    settings = {
        "bits": applied.num_bits,
        "symmetric": applied.symmetric,
        "group_size": applied.group_size if applied.strategy == "group" else None,
        "act_order": actorder or "off",
        "block_size": modifier.block_size,
        "dampening": modifier.dampening_frac,
    }
    result = {
        "run": f"llmcompressor {llmcompressor.__version__} GPTQModifier",
        "device": str(device),
        "parameters": params,
        "decoder_layers": config.num_hidden_layers,
        "linear_layers_quantized": len(quantized),
        "calibration": {"samples": len(samples), "seq_len": len(samples[0])},
        "build_seconds": build_seconds,
        "stage_seconds": stage_seconds,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "layer_seconds": seconds,
        "median_seconds": {"seconds": statistics.median(seconds)},
        "settings": settings,
        "modifier": repr(modifier)[:1000],
        "checks": {
            "ok": len(quantized) == expected and len(seconds) == config.num_hidden_layers,
            "layers_quantized": len(quantized),
            "layers_expected": expected,
        },
    }
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    head = (
        "| run | settings | column loop | layers | calibration | per layer, median (s) | Hessians (s) | GPTQ solves (s) "
        "| RTN baseline (s) "
        "| forward + moves (s) | stage (s) | peak GPU allocated (GiB) | peak GPU reserved (GiB) | peak host RSS (GiB) "
        "| check |"
    )
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in results:
        m, c = r["median_seconds"], r["calibration"]
        split = [f"{m[k]:.2f}" if k in m else "–" for k in ("hessian", "solve", "rtn_reference", "rest")]
        lines.append(
            f"| {r['run']} | {describe(r['settings'])} | {', '.join(r['checks'].get('column_loop', ['–']))} "
            f"| {r['decoder_layers']} | {c['samples']} × {c['seq_len']} | {m['seconds']:.2f} | "
            + " | ".join(split)
            + f" | {r['stage_seconds']:.1f} | {gib(r['peak_device_bytes'])} | {gib(r['peak_device_reserved_bytes'])} "
            f"| {gib(r['peak_host_rss_bytes'])} | {'ok' if r['checks']['ok'] else 'FAILED'} |"
        )
    return "\n".join(lines)


def child(args, which: str) -> dict | None:
    """One run in a process of its own (its own peak memories); the allocator's settings go in its environment."""
    environ = dict(os.environ)
    if args.expandable_segments:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "scripts.bench_gptq_gpu", "--child", which, "--result", str(result_file)]
        command += ["--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
        command += ["--tiny"] if args.tiny else []
        command += [
            flag
            for flag, on in (
                ("--eager", args.eager),
                ("--unfused", args.unfused),
                ("--fp32-products", args.fp32_products),
                ("--act-order", args.act_order),
                ("--no-rtn-reference", args.no_rtn_reference),
                ("--expandable-segments", args.expandable_segments),
                ("--old-paths", args.old_paths),
                ("--no-overlap", args.no_overlap),
                ("--profile", args.profile),
            )
            if on
        ]
        command += ["--trace", str(args.trace)] if args.profile and args.trace else []
        for flag, value in (("--layers", args.layers), ("--samples", args.samples), ("--seq-len", args.seq_len)):
            command += [flag, str(value)] if value is not None else []
        code = subprocess.run(command, cwd=ROOT, env=environ, check=False).returncode
        if not result_file.exists():
            print(f"the {which} run failed (exit {code})", file=sys.stderr)
            return None
        return json.loads(result_file.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="a small Llama (hidden 256) and 8 × 128 tokens")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--eager", action="store_true", help="ours without CUDA graphs (cuda_graphs: false)")
    parser.add_argument("--unfused", action="store_true", help="ours without the fused Triton column loop")
    parser.add_argument(
        "--fp32-products",
        action="store_true",
        help="ours with float32 copies (TF32) for the Hessian products, not bf16 ones",
    )
    parser.add_argument(
        "--act-order",
        action="store_true",
        help="both tools with activation ordering, static groups (ours act_order: true, "
        "LLM Compressor actorder: static); default: off in both",
    )
    parser.add_argument(
        "--no-rtn-reference",
        action="store_true",
        help="ours without the report-only RTN reference (rtn_reference: false)",
    )
    parser.add_argument(
        "--expandable-segments",
        action="store_true",
        help="runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the reserve stays near what is allocated)",
    )
    parser.add_argument(
        "--old-paths",
        action="store_true",
        help="ours with session 6's factor (Cholesky, inverse, Cholesky) and full Hessian products, "
        "instead of the reversed-Cholesky factor and upper-triangle products",
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="ours with overlap: false (the solves one after another, each block moved on use), "
        "instead of the solves on two streams and blocks prefetched and written back behind",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more run of ours (after the others) with torch.profiler over layer 2; its top operations "
        "go in the results (its times are not comparable: profiling slows the layer)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="with --profile: also write the profiled layer's timeline (Chrome trace JSON) here",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="ours four times in one invocation: as the other flags say, then with --no-rtn-reference and "
        "--expandable-segments on session 6's paths without overlap (--old-paths --no-overlap), on the "
        "current paths without overlap (--no-overlap) and with it; then LLM Compressor",
    )
    parser.add_argument("--no-llmcompressor", action="store_true", help="skip LLM Compressor's run")
    parser.add_argument("--json", type=Path, default=None, help="results file (default $OUT/bench_gptq_gpu.json)")
    parser.add_argument("--child", choices=["ours", "llmcompressor"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_ours(args) if args.child == "ours" else run_llmcompressor(args)
        args.result.write_text(json.dumps(result))
        return 0 if result["checks"]["ok"] else 1

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu)")
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    plain = argparse.Namespace(**{**vars(args), "profile": False})
    after = argparse.Namespace(**{**vars(plain), "no_rtn_reference": True, "expandable_segments": True})
    results = [r for r in [child(plain, "ours")] if r is not None]
    pair = []  # ours without and with overlap, on the current paths
    if args.compare:
        serial = argparse.Namespace(**{**vars(after), "no_overlap": True})
        before = argparse.Namespace(**{**vars(serial), "old_paths": True})
        overlapped = argparse.Namespace(**{**vars(after), "no_overlap": False})
        results += [r for r in [child(before, "ours")] if r is not None]
        pair = [r for r in [child(serial, "ours"), child(overlapped, "ours")] if r is not None]
        results += pair
    if args.no_llmcompressor:
        pass
    elif importlib.util.find_spec("llmcompressor") is None:
        print("llmcompressor is not importable: LLM Compressor's GPTQ not run", flush=True)
    else:
        results += [r for r in [child(args, "llmcompressor")] if r is not None]
    profiled = None
    if args.profile:  # the configuration of the last run of ours
        profiled = child(argparse.Namespace(**{**vars(after if args.compare else args), "profile": True}), "ours")
    if not results:
        return 1

    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    print(
        f"\nGPTQ, sequential, {shape}, {results[0]['decoder_layers']} decoder layers, "
        f"{results[0]['parameters'] / 1e9:.2f}B parameters, bf16, device {args.device}"
        + (f" ({env['gpu']})" if "gpu" in env else "")
    )
    for r in results:
        print(f"{r['run']}: {describe(r['settings'])}")
    print(table(results))
    for r in results:
        print(f"{r['run']}: per layer (s) " + ", ".join(f"{s:.2f}" for s in r["layer_seconds"]))
    theirs = next((r for r in results if r["run"].startswith("llmcompressor")), None)
    for ours in (r for r in results if r["run"].startswith("compress")):
        rtn = "–" if ours["mean_rtn_objective"] is None else f"{ours['mean_rtn_objective']:.4f}"
        print(
            f"{ours['run']}: mean relative output error (H-weighted): gptq {ours['mean_objective']:.4f}, "
            f"rtn {rtn}; checks: {json.dumps(ours['checks'])}"
        )
        if theirs is not None:
            ratio = ours["median_seconds"]["seconds"] / theirs["median_seconds"]["seconds"]
            print(
                f"{ours['run']}: time per layer, ours / LLM Compressor: {ratio:.3f} "
                f"(target <= 0.15: {'met' if ratio <= 0.15 else 'NOT met'})"
            )
        if args.device.startswith("cuda"):
            peak, reserved = ours["peak_device_bytes"], ours["peak_device_reserved_bytes"]
            print(
                f"{ours['run']}: peak GPU memory {peak / 1e9:.2f} GB allocated, {reserved / 1e9:.2f} GB reserved "
                f"(target < 3 GB: {'met' if peak < 3 * 10**9 else 'NOT met'}); "
                f"floor ~1 s per layer: median {ours['median_seconds']['seconds']:.2f} s"
            )

    if len(pair) == 2:
        serial, overlapped = pair
        same = serial["checks"]["weights_sha256"] == overlapped["checks"]["weights_sha256"]
        drift = abs(overlapped["mean_objective"] - serial["mean_objective"]) / serial["mean_objective"]
        print(
            f"overlap: per layer {serial['median_seconds']['seconds']:.3f} s -> "
            f"{overlapped['median_seconds']['seconds']:.3f} s; quantized weights "
            + ("bit-identical" if same else f"differ (mean objective relative difference {drift:.2e})")
        )
    if profiled is not None:
        print(f"\n{profiled['run']}: top operations by {'device' if args.device.startswith('cuda') else 'host'} time")
        for row in profiled["profile"]:
            print(
                f"  {row['self_device_ms']:9.2f} ms device {row['self_host_ms']:9.2f} ms host {row['calls']:6d}x  {row['name']}"
            )
        results.append(profiled)
    save_results(args.json, "bench_gptq_gpu.json", "bench_gptq_gpu", argv, {"environment": env, "results": results})
    return 0 if all(r["checks"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
