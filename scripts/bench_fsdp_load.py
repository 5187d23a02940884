"""Per-process peak host memory of loading a model for FSDP training: lazily, as ``compress apply``
does under FSDP (:func:`compress.training.sharding.load_unread`: the model on the meta device,
each process reading only its rows of each tensor from the memory-mapped shards), against
eagerly (every process reads the whole model onto its host, then shards it), at one number of
layers per launch. Run it at two layer counts: the lazy figure stays flat, the eager one grows
with the model.

Measured in each process: the growth of its peak RSS (``ru_maxrss``) from just before the load
to just after :func:`compress.training.sharding.shard_model`, less the bytes of its own local
shards when they live on the host (the CPU; on a GPU they are device memory): what loading
costs the host beyond the process's share of the model. Also each process's local shard bytes,
a checksum of its local shards (lazy and eager must agree) and whether the head stays tied to
the embeddings.

Build a model once (one process; random bf16 weights, tied head), then measure::

    python -m scripts.bench_fsdp_load build DIR --layers 4
    torchrun --nproc_per_node 2 -m scripts.bench_fsdp_load measure DIR --path lazy --json OUT/lazy4.json

``--smoke`` builds a narrow Llama (hidden 1024, intermediate 4096, vocab 257) for the CPU;
without it, Llama-3-8B's shape. ``measure`` on CUDA when available (NCCL), else the CPU (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from scripts.common import environment, llama_config, random_model

NARROW = {"hidden_size": 1024, "intermediate_size": 4096, "vocab_size": 257}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write a random-weight Llama checkpoint")
    build.add_argument("dir", type=Path)
    build.add_argument("--layers", type=int, required=True)
    build.add_argument("--smoke", action="store_true", help="the narrow CPU shape, not Llama-3-8B's")
    measure = commands.add_parser("measure", help="load it sharded (under torchrun) and report memory")
    measure.add_argument("dir", type=Path)
    measure.add_argument("--path", choices=("lazy", "eager"), required=True)
    measure.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def build(directory: Path, layers: int, smoke: bool) -> None:
    """A random-weight, tied-head Llama of ``layers`` layers saved into ``directory`` (bf16)."""
    config = llama_config(smoke, layers)
    config.tie_word_embeddings = True
    if smoke:
        for key, value in NARROW.items():
            setattr(config, key, value)
    model = random_model(config, seed=0, threads=os.cpu_count() or 1)
    model.tie_weights()
    model.save_pretrained(directory)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(directory: Path, path: str) -> dict:
    """Load ``directory`` the ``path`` way and shard it over the processes; this process's figures."""
    from torch.distributed.tensor import DTensor

    from compress.checkpoint.loaders import DirectoryLoader
    from compress.recipe import ModelSpec
    from compress.training.sharding import load_unread, shard_model

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    loader, spec = DirectoryLoader(), ModelSpec(name=str(directory))
    base = peak_rss_bytes()
    started = time.perf_counter()
    model = (load_unread(loader, spec) if path == "lazy" else loader.load(spec)).model
    shard_model(model, device)
    seconds = time.perf_counter() - started
    grown = peak_rss_bytes() - base
    locals_ = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    local_bytes = sum(t.numel() * t.element_size() for t in locals_)
    on_host = local_bytes if device.type == "cpu" else 0
    return {
        "rank": torch.distributed.get_rank(),
        "seconds": seconds,
        "peak_rss_growth_bytes": grown,
        "local_shard_bytes": local_bytes,
        "host_overhead_bytes": grown - on_host,
        "checksum": float(sum(t.double().sum().item() for t in locals_)),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "build":
        build(args.dir, args.layers, args.smoke)
        print(f"built {args.dir}", flush=True)
        return 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend)
    figures = measure(args.dir, args.path)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, figures)
    if torch.distributed.get_rank() == 0:
        config = json.loads((args.dir / "config.json").read_text())
        results = {
            "command": " ".join(sys.argv),
            "environment": environment("cuda" if backend == "nccl" else "cpu"),
            "path": args.path,
            "layers": config["num_hidden_layers"],
            "shape": {k: config[k] for k in ("hidden_size", "intermediate_size", "vocab_size")},
            "checkpoint_bytes": sum(f.stat().st_size for f in args.dir.glob("*.safetensors")),
            "processes": gathered,
        }
        overheads = [f"{p['host_overhead_bytes'] / 2**20:.0f}" for p in gathered]
        print(f"{args.path}, {results['layers']} layers: host overhead MiB per process {overheads}", flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    # a gloo rank that tears its group down while rank 0 is still writing can abort
    # ("terminate called without an active exception", seen once in CI): leave together
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
