"""The 2:4 speed path: a checkpoint's verified 2:4 Linear layers on torch's semi-structured
sparse kernels (``torch.sparse.to_sparse_semi_structured``: CUTLASS or cuSPARSELt, fp16/bf16,
CUDA compute capability 8.0+), timed against the same layers dense.

Which layers: the ones the checkpoint's ``sparsity_config`` marks 2:4, or those the user
names (``--layer``, names or ``re:`` patterns). Each is verified to hold 2:4 before anything
else happens (the kernels do not check: a broken group would silently compute something
else); a broken one stops the command, naming it. On a machine without such a GPU the
command says so after verifying.

Timings (CUDA events, median of ``reps`` after a warm-up): each distinct Linear shape on
``tokens`` rows of random activations, dense ``F.linear`` vs semi-structured, and the whole
model's prefill (one forward pass over ``tokens`` random token ids) before and after the
conversion. The linear-layer speedup weighs each shape by how many selected layers have it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.api import UserError, semi_structured_layers, to_semi_structured, verify_n_m

MIN_CAPABILITY = (8, 0)


def select_layers(model: nn.Module, marked: list[str], requested: list[str]) -> list[str]:
    """The layers to accelerate: ``requested`` (names or ``re:`` patterns) if any, else ``marked``.

    A requested name or pattern that matches no Linear layer is a UserError naming it, as is
    a selection that ends up empty.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not requested:
        if not marked:
            raise UserError("the checkpoint marks no layer 2:4 (sparsity_config); name layers with --layer")
        return list(marked)
    selected: list[str] = []
    for entry in requested:
        if entry.startswith("re:"):
            found = [name for name in linears if re.fullmatch(entry[3:], name)]
        else:
            found = [entry] if entry in linears else []
        if not found:
            raise UserError("matches no Linear layer of the checkpoint", entry)
        selected += [name for name in found if name not in selected]
    return selected


def verify_layers(model: nn.Module, names: list[str]) -> None:
    """Raise UserError naming the first selected layer whose weight is not 2:4."""
    modules = dict(model.named_modules())
    for name in names:
        verify_n_m(modules[name].weight, 2, 4, name=name)


def accelerator_problem(device: torch.device) -> str | None:
    """Why semi-structured kernels cannot run on ``device``, in one sentence; None when they can."""
    if device.type != "cuda":
        gpu = " (a CUDA GPU is available: pass --device cuda)" if torch.cuda.is_available() else ""
        return f"semi-structured sparse kernels need a CUDA GPU of compute capability 8.0+, not {device}{gpu}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"semi-structured sparse kernels need compute capability 8.0+; {name} has {capability[0]}.{capability[1]}"
        )
    return None


def cuda_seconds(function: Any, reps: int) -> float:
    """Median seconds of ``function()`` on the current CUDA stream, after two warm-up calls."""
    for _ in range(2):
        function()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def shapes(model: nn.Module, names: list[str]) -> Counter:
    """How many selected layers have each ``(out_features, in_features)``."""
    modules = dict(model.named_modules())
    return Counter(tuple(modules[name].weight.shape) for name in names)


@torch.no_grad()
def linear_seconds(model: nn.Module, names: list[str], tokens: int, reps: int) -> dict[tuple[int, int], float]:
    """Seconds of one Linear of each selected shape on ``tokens`` rows (the layers as they are now)."""
    modules = dict(model.named_modules())
    first = {}
    for name in names:
        first.setdefault(tuple(modules[name].weight.shape), name)
    result = {}
    for name in first.values():
        module = modules[name]
        rows, columns = module.weight.shape
        x = torch.randn(tokens, columns, device=module.weight.device, dtype=module.weight.dtype)
        result[(rows, columns)] = cuda_seconds(lambda m=module, x=x: F.linear(x, m.weight, m.bias), reps)
    return result


@torch.no_grad()
def prefill_seconds(model: nn.Module, tokens: int, reps: int, seed: int = 0) -> float:
    """Seconds of one forward pass of ``model`` over ``tokens`` random token ids (batch of one)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(model.device)
    return cuda_seconds(lambda: model(input_ids=ids, use_cache=False), reps)


def measure(model: nn.Module, names: list[str], tokens: int, reps: int) -> dict[str, Any]:
    """Dense timings, the conversion of ``names``, then the same timings sparse (the model on its GPU)."""
    counts = shapes(model, names)
    dense_linear = linear_seconds(model, names, tokens, reps)
    dense_prefill = prefill_seconds(model, tokens, reps)
    to_semi_structured(model, names)
    sparse_linear = linear_seconds(model, names, tokens, reps)
    sparse_prefill = prefill_seconds(model, tokens, reps)
    rows = [
        {
            "shape": list(shape),
            "layers": counts[shape],
            "dense_ms": dense_linear[shape] * 1e3,
            "sparse_ms": sparse_linear[shape] * 1e3,
            "speedup": dense_linear[shape] / sparse_linear[shape],
        }
        for shape in sorted(counts)
    ]
    dense_total = sum(counts[s] * dense_linear[s] for s in counts)
    sparse_total = sum(counts[s] * sparse_linear[s] for s in counts)
    return {
        "tokens": tokens,
        "layers": len(names),
        "per_shape": rows,
        "linear_speedup": dense_total / sparse_total,
        "linear_dense_ms": dense_total * 1e3,
        "linear_sparse_ms": sparse_total * 1e3,
        "prefill_dense_ms": dense_prefill * 1e3,
        "prefill_sparse_ms": sparse_prefill * 1e3,
        "prefill_speedup": dense_prefill / sparse_prefill,
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    """The table the command prints."""
    lines = [f"{result['layers']} layers on 2:4 semi-structured kernels, {result['tokens']} tokens"]
    lines.append("shape (out x in)   layers   dense ms   2:4 ms   speedup")
    for row in result["per_shape"]:
        shape = f"{row['shape'][0]} x {row['shape'][1]}"
        lines.append(
            f"{shape:<18} {row['layers']:>6} {row['dense_ms']:>10.3f} {row['sparse_ms']:>8.3f} {row['speedup']:>8.2f}x"
        )
    lines.append(
        f"linear layers: {result['linear_dense_ms']:.2f} ms dense, {result['linear_sparse_ms']:.2f} ms 2:4, "
        f"{result['linear_speedup']:.2f}x"
    )
    lines.append(
        f"prefill end to end: {result['prefill_dense_ms']:.2f} ms dense, {result['prefill_sparse_ms']:.2f} ms 2:4, "
        f"{result['prefill_speedup']:.2f}x"
    )
    return lines


def quantized(directory: Path) -> bool:
    """Whether the checkpoint's config.json declares quantized weights (compressed-tensors config groups)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return bool((config.get("quantization_config") or {}).get("config_groups"))


def run(
    directory: Path, requested: list[str], device: torch.device, dtype: torch.dtype, tokens: int, reps: int
) -> dict[str, Any]:
    """The command: select, verify, refuse off-GPU, load onto the GPU, measure."""
    from transformers import AutoModelForCausalLM

    marked = semi_structured_layers(directory)
    if quantized(directory):
        raise UserError(
            "the checkpoint holds quantized weights; the speed path runs 16-bit 2:4 weights (a checkpoint "
            "written without a quantizing stage)",
            str(directory),
        )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    names = select_layers(model, marked, requested)
    verify_layers(model, names)
    problem = accelerator_problem(device)
    if problem is not None:
        raise UserError(f"{problem}; {len(names)} layers verified 2:4, nothing timed")
    model.to(device)
    return measure(model, names, tokens, reps)
