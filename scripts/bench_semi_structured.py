"""2:4 deployment benchmark: prefill of a Llama-3-8B-shaped model on semi-structured kernels vs dense (GPU).

The random-weight model of ``scripts.common`` (Llama-3-8B's published shape, bf16,
N(0, 0.02) weights; ``--layers`` decoder layers, default all 32) has every decoder Linear
(q/k/v/o/gate/up/down; not lm_head) pruned 2:4 by magnitude, and is then measured by the
speed path of ``compress semi-structured`` (``compress_nm.semi_structured.measure``, the
same code): the pattern verified, each distinct Linear shape timed on ``--tokens`` rows
(dense ``F.linear`` vs ``torch.sparse`` semi-structured), then one forward pass of the whole
model over ``--tokens`` random token ids (batch of one, no KV cache) before and after the
conversion (CUDA events, median of ``--reps`` after two warm-up passes). The linear
speedup weighs each shape by its count of layers; the end-to-end figure includes
attention, norms, embeddings and lm_head, which stay dense. Random weights give honest
timings (the same arithmetic). Every figure is taken twice: launched eagerly, and replayed
from a CUDA graph captured once (see ``compress_nm.semi_structured``: torch's cuSPARSELt
matmul sets up its descriptors and plan on the host at every call, which a replay skips).
Results: OUT/bench_semi_structured.json.

``--micro`` times single matmuls instead, kernels against kernels: 4096 rows of
activations times a 4096x4096, 1024x4096, 14336x4096 and 4096x14336 weight (out x in), dense
``F.linear`` against the same 2:4 weight on each backend (cuSPARSELt with its default
algorithm and with the one ``torch._cslt_sparse_mm_search`` picks, CUTLASS), each eager and
from a CUDA graph, with the largest relative error to dense. Results:
OUT/bench_semi_structured_micro.json.

Usage::

    python -m scripts.bench_semi_structured --out OUT          # H100: about 4 minutes (the model is built on the host)
    python -m scripts.bench_semi_structured --micro --out OUT  # H100: about a minute
    python -m scripts.bench_semi_structured --smoke --out /tmp/x  # CPU: tiny model, verification and the refusal only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from compress_nm.patterns import NMPattern, nm_keep_mask
from compress_nm.semi_structured import (
    accelerator_problem,
    backend_problem,
    both_seconds,
    cusparselt_search,
    measure,
    report_lines,
    semi_structured_backend,
    verify_layers,
)
from scripts.common import environment, llama_config, random_model

DECODER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")
MICRO_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
"""Weights (out x in) of the micro-benchmark: Llama-3-8B's q/o, k/v, gate/up and down projections."""


@torch.no_grad()
def prune_2_of_4(model: torch.nn.Module) -> list[str]:
    """Magnitude 2:4 on every decoder Linear, in place; returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(name):
            module.weight.mul_(nm_keep_mask(module.weight.abs(), NMPattern(2, 4)))
            names.append(name)
    return names


def two_of_four(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random N(0, 0.02) weight pruned 2:4 by magnitude."""
    weight = torch.randn(rows, columns, device=device, dtype=torch.float32) * 0.02
    return (weight * nm_keep_mask(weight.abs(), NMPattern(2, 4))).to(dtype)


@torch.no_grad()
def micro(tokens: int, reps: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Single matmuls, dense against each backend, eager and from a CUDA graph (see the module docstring)."""
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_features, in_features in MICRO_SHAPES:
        weight = two_of_four(out_features, in_features, dtype, device)
        x = torch.randn(tokens, in_features, device=device, dtype=dtype)
        reference = F.linear(x, weight)
        dense = both_seconds(lambda x=x, w=weight: F.linear(x, w), reps)
        variants = [("cutlass", None)]
        if backend_problem("cusparselt") is None:
            variants = [("cusparselt", "default"), ("cusparselt", "searched"), *variants]
        for backend, algorithm in variants:
            row = {"shape": [out_features, in_features], "tokens": tokens, "backend": backend}
            try:
                with semi_structured_backend(backend):
                    sparse = to_sparse_semi_structured(weight)
                F.linear(x, sparse)
            except RuntimeError as error:  # a backend this build or GPU lacks
                rows.append(row | {"error": str(error).splitlines()[0][:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            if algorithm == "searched":
                found = cusparselt_search(x, sparse)
                if found is None:
                    continue
                sparse.alg_id_cusparselt = found
                row["alg_id"] = found
            elif algorithm == "default":
                row["alg_id"] = sparse.alg_id_cusparselt
            output = F.linear(x, sparse)
            row["max_relative_error"] = float((output - reference).abs().max() / reference.abs().max())
            timing = both_seconds(lambda x=x, w=sparse: F.linear(x, w), reps)
            for key, suffix in (("eager", ""), ("graph", "_graph")):
                row[f"dense{suffix}_ms"] = None if dense[key] is None else dense[key] * 1e3
                row[f"sparse{suffix}_ms"] = None if timing[key] is None else timing[key] * 1e3
                row[f"speedup{suffix}"] = None if None in (dense[key], timing[key]) else dense[key] / timing[key]
            row.update({k: v for k, v in timing.items() if k == "graph_error"})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def micro_lines(rows: list[dict]) -> list[str]:
    """The micro-benchmark's table."""
    lines = [
        "| weight (out x in) | backend | alg | dense eager ms | 2:4 eager ms | eager | dense graph ms "
        "| 2:4 graph ms | graph | max rel. error |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['backend']} | failed: {r['error']} |" + " |" * 7)
            continue
        cells = [
            f"{r[k]:.3f}" if r[k] is not None else "-"
            for k in ("dense_ms", "sparse_ms", "speedup", "dense_graph_ms", "sparse_graph_ms", "speedup_graph")
        ]
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['backend']} | {r.get('alg_id', '-')} | "
            + " | ".join(cells)
            + f" | {r['max_relative_error']:.1e} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 32)")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", choices=("cusparselt", "cutlass"), default="cusparselt")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--micro", action="store_true", help="single matmuls, dense against every backend")
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU: verification and refusal only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else args.device)
    dtype = getattr(torch, args.dtype)
    if args.micro:
        problem = accelerator_problem(device)
        if problem is not None:
            raise SystemExit(f"{problem}; nothing timed")
        rows = micro(args.tokens, args.reps, dtype, device)
        print("\n".join(micro_lines(rows)))
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(args.device), "dtype": args.dtype, "rows": rows}
        (args.out / "bench_semi_structured_micro.json").write_text(json.dumps(payload, indent=1))
        return

    config = llama_config(args.smoke, args.layers)
    started = time.perf_counter()
    model = random_model(config, args.seed, args.threads).to(dtype)  # built in bf16
    problem = accelerator_problem(device) or (None if args.smoke else backend_problem(args.backend))
    if problem is None:
        model.to(device)  # pruning 7B weights is faster there
    names = prune_2_of_4(model)
    verify_layers(model, names)
    print(f"built and pruned {len(names)} layers 2:4 in {time.perf_counter() - started:.1f} s", flush=True)
    if problem is not None:
        print(f"{problem}; {len(names)} layers verified 2:4, nothing timed")
        if args.smoke:
            return
        raise SystemExit(2)
    result = measure(model, names, args.tokens, args.reps, args.backend)
    for line in report_lines(result):
        print(line)
    result.update(
        environment=environment(args.device),
        decoder_layers=config.num_hidden_layers,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_semi_structured.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
