"""The 2:4 speed path: a checkpoint's verified 2:4 Linear layers on torch's semi-structured
sparse kernels (``torch.sparse.to_sparse_semi_structured``: cuSPARSELt or CUTLASS, fp16/bf16,
CUDA compute capability 8.0+), timed against the same layers dense.

Which layers: the ones the checkpoint's ``sparsity_config`` marks 2:4, or those the user
names (``--layer``, names or ``re:`` patterns). Each is verified to hold 2:4 before anything
else happens (the kernels do not check: a broken group would silently compute something
else); a broken one stops the command, naming it. On a machine without such a GPU the
command says so after verifying.

Timings (CUDA events, median of ``reps`` after two warm-up calls): each distinct Linear
shape on ``tokens`` rows of random activations, dense ``F.linear`` vs semi-structured, and
the whole model's prefill (one forward pass over ``tokens`` random token ids) before and
after the conversion; each both launched eagerly and replayed from a CUDA graph captured
once. The two differ by the host's work per call: torch's cuSPARSELt matmul
(``torch._cslt_sparse_mm``) builds and destroys its cuSPARSELt matmul descriptors and plan
on every call (pytorch/pytorch#153825), about half a millisecond of host time during which
the GPU idles, which a graph replay does not repeat; serving engines replay graphs. The
linear-layer speedup weighs each shape by how many selected layers have it. Weights are
converted once (``to_semi_structured``) and stay in the model's dtype; a (batch, seq,
hidden) activation reaches the kernel as a 2-D view, and the cuSPARSELt kernel writes the
transposed product directly (``transpose_result``), so no per-call copy is made. On
cuSPARSELt each weight shape gets the algorithm ``torch._cslt_sparse_mm_search`` finds
fastest on ``tokens`` rows (torch's default is algorithm 0).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run in this torch, in one sentence; None when it can."""
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch is built without cuSPARSELt (use --backend cutlass)"
    return None


@contextmanager
def semi_structured_backend(backend: str) -> Iterator[None]:
    """Make ``to_sparse_semi_structured`` build ``backend``'s tensors inside the block."""
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def cusparselt_search(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """The cuSPARSELt algorithm id ``torch._cslt_sparse_mm_search`` finds fastest for
    ``F.linear(x, weight)`` (the product that runs: the packed weight times xᵀ, the result
    transposed); None where this torch has no search or it fails."""
    try:
        return int(torch._cslt_sparse_mm_search(weight.packed, x.t(), transpose_result=True))
    except (AttributeError, RuntimeError, TypeError):
        return None


@torch.no_grad()
def tune_algorithms(model: nn.Module, names: list[str], tokens: int) -> dict[str, int | None]:
    """Give every converted cuSPARSELt layer the algorithm :func:`cusparselt_search` picks for its
    shape on ``tokens`` rows (torch's default is algorithm 0); returns the ids by shape."""
    modules = dict(model.named_modules())
    chosen: dict[tuple[int, int], int | None] = {}
    for name in names:
        weight = modules[name].weight
        shape = tuple(weight.shape)
        if shape not in chosen:
            x = torch.randn(tokens, shape[1], device=weight.device, dtype=weight.dtype)
            chosen[shape] = cusparselt_search(x, weight)
        if chosen[shape] is not None:
            weight.alg_id_cusparselt = chosen[shape]
    return {f"{rows}x{columns}": alg for (rows, columns), alg in chosen.items()}


def cuda_seconds(function: Callable[[], Any], reps: int, graph: bool = False) -> float:
    """Median seconds of ``function()`` on the current CUDA stream, after two warm-up calls.

    ``graph``: capture one call as a CUDA graph (warmed up on a side stream, as capture
    requires) and time its replays: the GPU work alone, without the host's per-call work.
    """
    run = function
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                function()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            function()
        run = captured.replay
    for _ in range(2):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def both_seconds(function: Callable[[], Any], reps: int) -> dict[str, float | str | None]:
    """Eager and CUDA-graph seconds of ``function``; a capture that fails leaves ``graph`` None
    and says why in ``graph_error``."""
    result: dict[str, float | str | None] = {"eager": cuda_seconds(function, reps), "graph": None}
    try:
        result["graph"] = cuda_seconds(function, reps, graph=True)
    except RuntimeError as error:
        result["graph_error"] = str(error).splitlines()[0][:300]
    return result


def shapes(model: nn.Module, names: list[str]) -> Counter:
    """How many selected layers have each ``(out_features, in_features)``."""
    modules = dict(model.named_modules())
    return Counter(tuple(modules[name].weight.shape) for name in names)


@torch.no_grad()
def linear_seconds(model: nn.Module, names: list[str], tokens: int, reps: int) -> dict[tuple[int, int], dict]:
    """:func:`both_seconds` of one Linear of each selected shape on ``tokens`` rows (the layers as
    they are now)."""
    modules = dict(model.named_modules())
    first = {}
    for name in names:
        first.setdefault(tuple(modules[name].weight.shape), name)
    result = {}
    for name in first.values():
        module = modules[name]
        rows, columns = module.weight.shape
        x = torch.randn(tokens, columns, device=module.weight.device, dtype=module.weight.dtype)
        result[(rows, columns)] = both_seconds(lambda m=module, x=x: F.linear(x, m.weight, m.bias), reps)
    return result


@torch.no_grad()
def prefill_seconds(model: nn.Module, tokens: int, reps: int, seed: int = 0) -> dict:
    """:func:`both_seconds` of one forward pass of ``model`` over ``tokens`` random token ids
    (batch of one, no KV cache)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(model.device)
    return both_seconds(lambda: model(input_ids=ids, use_cache=False), reps)


def _ratio(dense: float | None, sparse: float | None) -> float | None:
    return None if dense is None or sparse is None else dense / sparse


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _total(counts: Counter, timings: dict, key: str) -> float | None:
    values = [timings[shape][key] for shape in counts]
    return None if None in values else sum(counts[s] * timings[s][key] for s in counts)


def measure(model: nn.Module, names: list[str], tokens: int, reps: int, backend: str = "cusparselt") -> dict[str, Any]:
    """Dense timings, the conversion of ``names`` to ``backend``, then the same timings sparse
    (the model on its GPU), each eager and from a CUDA graph."""
    counts = shapes(model, names)
    dense_linear = linear_seconds(model, names, tokens, reps)
    dense_prefill = prefill_seconds(model, tokens, reps)
    with semi_structured_backend(backend):
        to_semi_structured(model, names)
    algorithms = tune_algorithms(model, names, tokens) if backend == "cusparselt" else None
    sparse_linear = linear_seconds(model, names, tokens, reps)
    sparse_prefill = prefill_seconds(model, tokens, reps)
    rows = []
    for shape in sorted(counts):
        dense, sparse = dense_linear[shape], sparse_linear[shape]
        row = {"shape": list(shape), "layers": counts[shape]}
        for key, suffix in (("eager", ""), ("graph", "_graph")):
            row[f"dense{suffix}_ms"], row[f"sparse{suffix}_ms"] = _ms(dense[key]), _ms(sparse[key])
            row[f"speedup{suffix}"] = _ratio(dense[key], sparse[key])
        rows.append(row)
    result: dict[str, Any] = {
        "tokens": tokens,
        "layers": len(names),
        "backend": type(model.get_submodule(names[0]).weight).__name__,
        "dtype": str(model.get_submodule(names[0]).weight.dtype).removeprefix("torch."),
        "cusparselt_algorithms": algorithms,
        "per_shape": rows,
    }
    for key, suffix in (("eager", ""), ("graph", "_graph")):
        dense_total, sparse_total = _total(counts, dense_linear, key), _total(counts, sparse_linear, key)
        result[f"linear{suffix}_speedup"] = _ratio(dense_total, sparse_total)
        result[f"linear{suffix}_dense_ms"], result[f"linear{suffix}_sparse_ms"] = _ms(dense_total), _ms(sparse_total)
        result[f"prefill{suffix}_dense_ms"] = _ms(dense_prefill[key])
        result[f"prefill{suffix}_sparse_ms"] = _ms(sparse_prefill[key])
        result[f"prefill{suffix}_speedup"] = _ratio(dense_prefill[key], sparse_prefill[key])
    errors = {
        what: timing["graph_error"]
        for what, timing in [("prefill dense", dense_prefill), ("prefill 2:4", sparse_prefill)]
        + [(f"linear {s[0]}x{s[1]} 2:4", sparse_linear[s]) for s in counts]
        if "graph_error" in timing
    }
    if errors:
        result["graph_errors"] = errors
    return result


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The table the command prints: eager launches, then CUDA-graph replays."""
    lines = [
        f"{result['layers']} layers on 2:4 semi-structured kernels ({result['backend']}, {result['dtype']}), "
        f"{result['tokens']} tokens; eager | CUDA graph"
    ]
    lines.append("shape (out x in)   layers   dense ms   2:4 ms   speedup | dense ms   2:4 ms   speedup")
    for row in result["per_shape"]:
        shape = f"{row['shape'][0]} x {row['shape'][1]}"
        lines.append(
            f"{shape:<18} {row['layers']:>6} {_cell(row['dense_ms'], '10.3f')} {_cell(row['sparse_ms'], '8.3f')} "
            f"{_cell(row['speedup'], '8.2f', 'x')} | {_cell(row['dense_graph_ms'], '8.3f')} "
            f"{_cell(row['sparse_graph_ms'], '8.3f')} {_cell(row['speedup_graph'], '8.2f', 'x')}"
        )
    for what, key in (("linear layers", "linear"), ("prefill end to end", "prefill")):
        parts = []
        for suffix, label in (("", "eager"), ("_graph", "CUDA graph")):
            dense, sparse = result[f"{key}{suffix}_dense_ms"], result[f"{key}{suffix}_sparse_ms"]
            speedup = result[f"{key}{suffix}_speedup"]
            parts.append(
                f"{label} {_cell(dense, '.2f')} ms dense, {_cell(sparse, '.2f')} ms 2:4, {_cell(speedup, '.2f', 'x')}"
            )
        lines.append(f"{what}: " + "; ".join(parts))
    for what, error in result.get("graph_errors", {}).items():
        lines.append(f"no CUDA graph for {what}: {error}")
    return lines


def quantized(directory: Path) -> bool:
    """Whether the checkpoint's config.json declares quantized weights (compressed-tensors config groups)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return bool((config.get("quantization_config") or {}).get("config_groups"))


def run(
    directory: Path,
    requested: list[str],
    device: torch.device,
    dtype: torch.dtype,
    tokens: int,
    reps: int,
    backend: str = "cusparselt",
) -> dict[str, Any]:
    """The command: select, verify, refuse off-GPU (or a backend this torch lacks), load onto the
    GPU, measure."""
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
    problem = accelerator_problem(device) or backend_problem(backend)
    if problem is not None:
        raise UserError(f"{problem}; {len(names)} layers verified 2:4, nothing timed")
    model.to(device)
    return measure(model, names, tokens, reps, backend)
