"""FSDP training of a model whose fine-tuning state does not fit one GPU: a random-weight
Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab
128256) with ``--layers`` decoder layers (default 24: 6.29B parameters, so fp32 master
weights + fp32 gradients + AdamW's two moments, 16 bytes a parameter, are 101 GB against an
H100's 80 GB), fully fine-tuned for a few steps through compress's training loop, then written
by the engine's gathered writer.

The model is built on the meta device and sharded there (:func:`compress.training.sharding.shard_model`),
then each process allocates and fills only its own shards on its GPU: no host or GPU ever
holds the whole model. Training is next-token cross-entropy on random tokens (a plain
fine-tuning stage: every Linear, embedding and norm trained), bf16 compute over fp32
shards, gradient checkpointing, global batch ``--batch`` x ``--seq-len``. The output is
gathered one block at a time into the main process, which streams safetensors shards.

Reported (JSON at ``--json``): parameters, the 16-bytes-a-parameter state against one GPU's
memory (the one-GPU arithmetic; nothing is run on one GPU), peak GPU memory of every process,
the loop's tokens/s (all processes together) and its steady rate after the first step,
seconds per phase, and the writing process's peak host RSS during the write.

On two GPUs (under 8 minutes with model creation and the write)::

    torchrun --nproc_per_node 2 -m scripts.bench_fsdp --json OUT/fsdp_h100.json
    # or: accelerate launch --num_processes 2 --use_fsdp -m scripts.bench_fsdp --json ...

On the CPU, a tiny shape end to end: ``torchrun --nproc_per_node 2 -m scripts.bench_fsdp --smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch

from compress import hookimpl
from compress.training.method import TrainingMethod
from scripts.common import GIB, environment, llama_config

STATE_BYTES_PER_PARAMETER = 16  # fp32 master weight + fp32 gradient + AdamW's two fp32 moments


class FineTune(TrainingMethod):
    """Next-token cross-entropy on the data: plain full fine-tuning (benchmark only)."""

    name = "finetune"
    default_targets: ClassVar[list[str]] = ["Linear", "Embedding", "LlamaRMSNorm"]
    default_ignore: ClassVar[list[str]] = []

    def configure_optimizer(self, groups):
        """AdamW, fused on CUDA: the default (foreach) step allocates temporaries as large as the
        moments, which would not fit beside 50 GB of state a GPU."""
        fused = all(parameter.is_cuda for group in groups for parameter in group["params"])
        return torch.optim.AdamW(groups, lr=self.params.lr, weight_decay=self.params.weight_decay, fused=fused or None)

    def loss(self, model, batches):
        return model(**batches["train"]).loss, {}


class FineTunePlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(FineTune)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the 8B shape (default 24)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch, samples per optimizer step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (2 processes, gloo)")
    return parser.parse_args(argv)


def materialized_sharded(config, device: torch.device) -> torch.nn.Module:
    """The model built on the meta device, sharded there, then each process's shards allocated on
    ``device`` and filled with N(0, 0.02) (norms 1): the whole model never exists anywhere."""
    from torch.distributed.tensor import DTensor
    from transformers import LlamaForCausalLM

    from compress.training.sharding import shard_model

    with torch.device("meta"):
        model = LlamaForCausalLM(config)  # fp32: the parameters are the trained masters
    shard_model(model, device, compute_dtype=torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(1234 + torch.distributed.get_rank())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=generator)
    rotary = model.model.rotary_emb  # its inv_freq buffer is garbage after to_empty: rebuild it
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=config)
    return model


def random_samples(count: int, seq_len: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Token samples (the same on every process: one seed) with full attention and labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (count, seq_len), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def build_context(host, model, config, device: torch.device, args: argparse.Namespace, out: Path):
    """The Context and checked-recipe stand-in of one fine-tuning stage over the in-memory model."""
    from compress.checkpoint import LoadedModel
    from compress.context import Context, Report, StageRecord, StageRun, environment_info
    from compress.recipe import Recipe
    from compress.targets import match_modules

    stage = {
        "method": "finetune",
        "steps": args.steps,
        "batch_size": args.batch,
        "micro_batch_size": 1 if args.smoke else None,
        "lr": 1e-5,
        "log_every": 1,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    }
    data_file = out.parent / f"{out.name}.data.txt"
    data_file.write_text("unused: the samples are given\n")
    recipe = Recipe.model_validate(
        {
            "model": "random-llama-3-8b-shape",
            "data": {"train": {"path": str(data_file), "samples": args.batch * 2, "seq_len": args.seq_len}},
            "stages": [stage],
            "run": {"device": str(device)},
            "output": {"dir": str(out), "max_shard_size": "2GB"},
        }
    )
    method = FineTune(FineTune.Params.model_validate(recipe.stages[0].params))
    selected, unmatched = match_modules(model, method.default_targets, method.default_ignore)
    assert not unmatched, unmatched
    loaded = LoadedModel(model, None, config, "causal-lm", base_model="random-llama-3-8b-shape")
    parameters = sum(p.numel() for p in model.parameters())
    report = Report(
        model={"name": "random", "base_model": "random", "task": "causal-lm", "parameters": parameters},
        environment=environment_info(device),
    )
    report.model["dtype"] = "bfloat16"  # what the output stores
    samples = random_samples(args.batch * 2, args.seq_len, config.vocab_size)
    context = Context(host, recipe, loaded, None, device, report, _data={"train": samples})
    record = StageRecord("finetune", "finetune", "training", method.params.model_dump(mode="json"), {})
    run = StageRun(recipe.stages[0], method, selected, record, 0, 1)
    writer = host.writers()["dense"]
    checked = SimpleNamespace(
        recipe=recipe,
        writer=writer,
        writer_options=writer.Options(),
        located=SimpleNamespace(as_run=lambda: "# bench_fsdp: built in memory\n"),
    )
    return context, run, checked


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    from accelerate import PartialState

    from compress.engine import write_gathered
    from compress.host import PluginHost
    from compress.training.loop import train
    from compress.training.sharding import sharding_active

    state = PartialState(cpu=args.smoke)  # the process group (torchrun's or accelerate launch's variables)
    if not sharding_active():
        print("run under torchrun/accelerate launch with 2 or more processes", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", state.local_process_index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main_process = state.is_main_process
    config = llama_config(args.smoke, 4 if args.smoke and args.layers == 24 else args.layers)
    if args.smoke:
        args.seq_len = min(args.seq_len, 64)
        args.steps = min(args.steps, 3)
    scratch = None
    out = args.out
    if out is None:  # one temporary directory, the main process's, removed at the end
        scratch = Path(_broadcast(tempfile.mkdtemp(prefix="bench-fsdp-") if main_process else ""))
        out = scratch / "out"
    host = PluginHost()
    host.load_plugins()
    host.register(FineTunePlugin, name="bench-finetune")

    def say(text: str) -> None:
        if main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    started = time.perf_counter()
    model = materialized_sharded(config, device)
    created = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    state_bytes = parameters * STATE_BYTES_PER_PARAMETER
    say(f"{parameters / 1e9:.2f}B parameters materialized sharded in {created:.1f} s")
    context, run, checked = build_context(host, model, config, device, args, out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_started = time.perf_counter()
    train(context, run, run.method)
    trained = time.perf_counter() - train_started
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    details = run.record.details
    say(f"trained {details['steps']} steps in {trained:.1f} s: {details['tokens_per_second']:.0f} tokens/s")
    write_started = time.perf_counter()
    write_gathered(context, checked, overwrite=True)
    written = time.perf_counter() - write_started
    say(f"written in {written:.1f} s to {out}")

    peaks = [None] * state.num_processes
    torch.distributed.all_gather_object(peaks, {"peak_device_bytes": peak_device, "peak_rss_bytes": peak_rss_bytes()})
    if main_process:
        capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        write_phase = context.report.phases.get("write", {})
        results = {
            "environment": environment(str(device)),
            "shape": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
            "parameters": parameters,
            "processes": state.num_processes,
            "batch": f"{args.batch} x {args.seq_len}",
            "steps": details["steps"],
            "full_state_bytes_16_per_parameter": state_bytes,
            "one_gpu_bytes": capacity,
            "fits_one_gpu": None if capacity is None else state_bytes < capacity,
            "create_seconds": created,
            "train_seconds": trained,
            "tokens_per_second": details["tokens_per_second"],
            "steady_tokens_per_second": details["steady_tokens_per_second"],
            "loss_curve": details["loss_curve"],
            "peak_device_bytes_per_process": [peak["peak_device_bytes"] for peak in peaks],
            "write_seconds": written,
            "write_peak_host_bytes": write_phase.get("peak_host_bytes"),
            "write_peak_pending_bytes": write_phase.get("peak_pending_bytes"),
            "peak_rss_bytes_per_process": [peak["peak_rss_bytes"] for peak in peaks],
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        }
        if capacity:
            say(f"16 B/parameter state: {state_bytes / GIB:.1f} GiB against one GPU's {capacity / GIB:.1f} GiB")
        say(json.dumps({k: v for k, v in results.items() if k not in ("environment", "loss_curve")}))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), **results}, indent=2) + "\n")
            say(f"wrote {args.json}")
    torch.distributed.barrier()
    if scratch is not None and main_process:
        shutil.rmtree(scratch)
    return 0


def _broadcast(value: str) -> str:
    """The main process's ``value`` on every process."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    sys.exit(main())
