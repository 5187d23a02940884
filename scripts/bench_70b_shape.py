"""70B-class PTQ on one GPU with bounded host memory: ``run: mode: lazy`` on a random-weight
Llama-3-70B-shaped checkpoint, at two depths, extrapolated to the full 80 layers.

The checkpoint (hidden 8192, intermediate 28672, 64 heads, 8 kv heads, vocab 128256,
untied, bf16) is written to local disk shard by shard: one shard per decoder layer
(about 1.7 GB) and one each for the embedding and the head, filled from a pool of
N(0, 0.02) values at random offsets, so no more than one shard is ever held. The deepest
checkpoint is written once; a shallower one is a directory of links to its first shards
with its own config.json and index. Each (method, depth) runs in a subprocess of its own
(its own peak host RSS), through the engine as ``compress apply`` runs it
(``compress.engine.apply_recipe`` on a recipe file): ``run: {mode: lazy}``, W4 symmetric
groups of 128 on every Linear but lm_head, written as compressed-tensors (``--format``),
calibration (gptq) of ``--samples`` × ``--seq-len`` byte-level tokens of random text.

Measured per run: seconds per decoder layer (block-done events; the median), the
stage's time, peak GPU memory (allocated and reserved), peak host RSS (the child's
``ru_maxrss``) and the engine's own deterministic figures (the most parameter bytes
materialized at once, the most bytes pending in the shard stream). The extrapolation to
80 layers is linear: the deeper run's wall time plus its median time per layer (first layer
left out) for each of the other layers; the memory figures are those of the deeper run
(they do not depend on the depth, which the two runs check). Random weights give honest timings, no quality.

Usage (GPU; the wheels as in ``scripts.bench_gptq_gpu``, one H100, about 5 minutes)::

    python -m scripts.bench_70b_shape --layers 2,6
    python -m scripts.bench_70b_shape --tiny --device cpu      # a small model on the CPU (logic check)

Results go to ``--json`` or ``$OUT/bench_70b_shape.json``; the scratch directory
(``--scratch``, default a temporary one) is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from scripts.common import (
    GIB,
    StageClock,
    checked_recipe,
    environment,
    gib,
    markdown_table,
    plugin_host,
    save_results,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_3_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
FULL_LAYERS = 80
SHARD = "500MB"
"""Output shards: about one W4 decoder layer each, so the bytes pending in the shard stream are
the same at every depth (a larger shard fills over more layers, and host memory with it)."""
POOL = 2**26  # random values the tensors are cut from (128 MB in bf16)
STAGES = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 128, "rtn_reference": False},
}


def llama_config(tiny: bool, layers: int):
    from transformers import LlamaConfig

    shape = TINY if tiny else LLAMA_3_70B
    return LlamaConfig(
        **shape,
        num_hidden_layers=layers,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def shard_of(name: str) -> str:
    """The shard a tensor goes to: one per decoder layer, the embedding and the rest apart."""
    if name.startswith("model.layers."):
        return f"layer-{int(name.split('.')[2]):05d}.safetensors"
    return "embed.safetensors" if name.startswith("model.embed_tokens") else "head.safetensors"


def write_checkpoint(directory: Path, config, seed: int, pool_size: int = POOL) -> dict[str, list[str]]:
    """Every shard of ``config``'s model, one at a time; returns the tensor names of each shard."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(shard_of(name), []).append(name)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(pool_size, generator=generator) * 0.02).to(torch.bfloat16)
    chooser = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for shard, names in shards.items():
        tensors = {}
        for name in names:
            count = math.prod(shapes[name])
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
                continue
            flat = torch.empty(count, dtype=torch.bfloat16)
            start, filled = chooser.randrange(pool_size), 0
            while filled < count:
                piece = min(count - filled, pool_size - start)
                flat[filled : filled + piece] = pool[start : start + piece]
                filled, start = filled + piece, 0
            tensors[name] = flat.view(shapes[name])
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        del tensors
    return shards


def depth_view(source: Path, target: Path, config, shards: dict[str, list[str]]) -> None:
    """A checkpoint of ``config``'s depth made of links to the first shards of ``source``."""
    layers = config.num_hidden_layers
    target.mkdir(parents=True)
    wanted = {s: n for s, n in shards.items() if not s.startswith("layer-") or int(s[6:11]) < layers}
    for shard in wanted:
        (target / shard).symlink_to(source / shard)
    weight_map = {name: shard for shard, names in wanted.items() for name in names}
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)


def write_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (256 ids): the calibration text needs one, the ids' values do not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)


def write_text(path: Path, tokens: int, seed: int) -> None:
    chooser = random.Random(seed)
    words = ["".join(chooser.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(2000)]
    text = []
    while sum(len(w) + 1 for w in text) < tokens * 1.1:
        text.append(chooser.choice(words))
    path.write_text(" ".join(text), encoding="utf-8")


def run_child(args) -> dict:
    """One (method, depth) through the engine in lazy mode; the figures of the run."""
    from compress.engine import apply_recipe

    device = torch.device(args.device)
    host = plugin_host(args.method)
    clock = StageClock(device)
    host.register(clock, name="bench-stage-clock")
    stage = dict(STAGES[args.method])
    stage_text = "  - " + json.dumps(stage) + "\n"
    recipe = (
        f"model: {{name: {args.model}, dtype: bfloat16}}\n"
        f"data:\n  calibration: {{path: {args.text}, samples: {args.samples}, seq_len: {args.seq_len}}}\n"
        f"stages:\n{stage_text}"
        f"output: {{dir: {args.output}, format: {args.format}, max_shard_size: {SHARD}}}\n"
        f"run: {{device: {args.device}, mode: lazy}}\n"
    )
    host, checked = checked_recipe(args.output.parent / f"{args.output.name}.yaml", recipe, args.threads, host)
    started = time.perf_counter()
    context = apply_recipe(host, checked, overwrite=True)
    wall = time.perf_counter() - started
    phases = context.report.phases
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    layers = context.model.config.num_hidden_layers
    output_bytes = sum(f.stat().st_size for f in args.output.glob("*.safetensors"))
    return {
        "method": args.method,
        "layers": layers,
        "format": args.format,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len} if args.method == "gptq" else None,
        "wall_seconds": wall,
        "load_seconds": phases["load"]["seconds"],
        "stage_seconds": phases["stages"]["seconds"],
        "write_seconds": phases["write"]["seconds"],
        "layer_seconds": seconds[:layers],
        "median_layer_seconds": statistics.median(seconds[1:layers] or seconds[:1]),
        "peak_device_bytes": phases["stages"]["peak_device_bytes"],
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_materialized_bytes": phases["stages"]["peak_materialized_bytes"],
        "peak_pending_bytes": phases["write"]["peak_pending_bytes"],
        "output_bytes": output_bytes,
        "all_released": all(p.is_meta for p in context.model.parameters()),
    }


def child(args, method: str, model: Path, output: Path, text: Path) -> dict | None:
    result_file = output.parent / f"{output.name}.result.json"
    command = [sys.executable, "-m", "scripts.bench_70b_shape", "--child", method, "--result", str(result_file)]
    command += ["--model", str(model), "--output", str(output), "--text", str(text), "--device", args.device]
    command += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--format", args.format]
    command += ["--threads", str(args.threads)]
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    shutil.rmtree(output, ignore_errors=True)
    if not result_file.exists():
        print(f"the {method} run on {model.name} failed (exit {code})", file=sys.stderr)
        return None
    return json.loads(result_file.read_text())


def extrapolate(shallow: dict, deep: dict, layers: int = FULL_LAYERS) -> dict:
    """The full model's figures from two depths: the deeper run's wall time plus its median time
    per layer (its first layer, which also captures the calibration inputs and compiles kernels,
    left out) for each layer more; memory as measured deepest. The slope between the two depths'
    stage times is kept as a cross-check (one-time costs in either run make it noisy)."""
    per_layer = deep["median_layer_seconds"]
    return {
        "layers": layers,
        "seconds_per_layer": per_layer,
        "slope_seconds_per_layer": (deep["stage_seconds"] - shallow["stage_seconds"])
        / (deep["layers"] - shallow["layers"]),
        "wall_seconds": deep["wall_seconds"] + (layers - deep["layers"]) * per_layer,
        "peak_device_bytes": deep["peak_device_bytes"],
        "peak_host_rss_bytes": deep["peak_host_rss_bytes"],
        "host_rss_growth_bytes": deep["peak_host_rss_bytes"] - shallow["peak_host_rss_bytes"],
        "materialized_growth_bytes": deep["peak_materialized_bytes"] - shallow["peak_materialized_bytes"],
    }


def table(results: list[dict]) -> str:
    columns = [
        "method",
        "layers",
        "per layer, median (s)",
        "stage (s)",
        "wall (s)",
        "peak GPU allocated (GiB)",
        "peak GPU reserved (GiB)",
        "peak host RSS (GiB)",
        "most materialized (GiB)",
        "output (GiB)",
    ]
    rows = [
        [
            r["method"],
            r["layers"],
            f"{r['median_layer_seconds']:.2f}",
            f"{r['stage_seconds']:.1f}",
            f"{r['wall_seconds']:.1f}",
            *(gib(r[key]) for key in ("peak_device_bytes", "peak_device_reserved_bytes", "peak_host_rss_bytes")),
            gib(r["peak_materialized_bytes"]),
            gib(r["output_bytes"]),
        ]
        for r in results
    ]
    return markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small Llama (hidden 256) on 8 × 128 tokens")
    parser.add_argument("--layers", default="2,6", help="two depths, comma-separated (default 2,6)")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128; tiny 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 128)")
    parser.add_argument("--format", default="compressed-tensors", help="output format (default compressed-tensors)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=sorted(STAGES), help=argparse.SUPPRESS)
    for hidden in ("--result", "--model", "--output", "--text"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.samples = args.samples or (8 if args.tiny else 128)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)

    if args.child:
        args.method = args.child
        result = run_child(args)
        print(json.dumps(result), flush=True)
        args.result.write_text(json.dumps(result))
        return 0

    depths = sorted(int(d) for d in args.layers.split(","))
    if len(depths) != 2 or depths[0] == depths[1]:
        parser.error("--layers takes two different depths, e.g. 2,6")
    env = environment(args.device)
    print(json.dumps(env), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench70b-", dir=args.scratch))
    try:
        results = measure(args, scratch, depths)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shape = "tiny Llama" if args.tiny else "Llama-3-70B shape"
    print(f"\nlazy PTQ, {shape}, W4 g128 symmetric, {args.format}, device {args.device} ({env.get('gpu', 'cpu')})")
    print(table(results["runs"]))
    for method, full in results["extrapolated"].items():
        print(
            f"{method}, {full['layers']} layers (extrapolated): {full['wall_seconds'] / 60:.1f} min "
            f"({full['seconds_per_layer']:.2f} s per layer), peak GPU {gib(full['peak_device_bytes'])} GiB, "
            f"peak host RSS {gib(full['peak_host_rss_bytes'])} GiB (growth from {depths[0]} to {depths[1]} "
            f"layers: RSS {full['host_rss_growth_bytes'] / GIB:+.2f} GiB, materialized "
            f"{full['materialized_growth_bytes'] / GIB:+.2f} GiB)"
        )
    save_results(args.json, "bench_70b_shape.json", "bench_70b_shape", argv, {"environment": env, **results})
    ok = all(r["all_released"] for r in results["runs"]) and len(results["runs"]) == 2 * len(results["extrapolated"])
    return 0 if ok else 1


def measure(args, scratch: Path, depths: list[int]) -> dict:
    """Write the deepest checkpoint, view the shallow one, run every method at both depths."""
    started = time.perf_counter()
    deepest = scratch / f"layers-{depths[1]}"
    config = llama_config(args.tiny, depths[1])
    shards = write_checkpoint(deepest, config, args.seed, 2**16 if args.tiny else POOL)
    config.save_pretrained(deepest)
    write_tokenizer(deepest)
    models = {depths[1]: deepest, depths[0]: scratch / f"layers-{depths[0]}"}
    depth_view(deepest, models[depths[0]], llama_config(args.tiny, depths[0]), shards)
    text = scratch / "calibration.txt"
    write_text(text, args.samples * args.seq_len, args.seed)
    print(f"wrote the {depths[1]}-layer checkpoint in {time.perf_counter() - started:.1f} s", flush=True)
    runs, extrapolated = [], {}
    for method in args.methods.split(","):
        measured = []
        for depth in depths:
            result = child(args, method, models[depth], scratch / f"out-{method}-{depth}", text)
            if result is not None:
                measured.append(result)
                print(f"{method}, {depth} layers: {result['wall_seconds']:.1f} s", flush=True)
        runs += measured
        if len(measured) == 2:
            extrapolated[method] = extrapolate(*measured)
    return {"runs": runs, "extrapolated": extrapolated}


if __name__ == "__main__":
    sys.exit(main())
