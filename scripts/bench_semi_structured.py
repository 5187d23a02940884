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
timings (the same arithmetic). Results: OUT/bench_semi_structured.json.

Usage::

    python -m scripts.bench_semi_structured --out OUT          # H100: about 3 minutes (the model is built on the host)
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
from compress_nm.semi_structured import accelerator_problem, measure, report_lines, verify_layers
from scripts.common import environment, llama_config, random_model

DECODER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")


@torch.no_grad()
def prune_2_of_4(model: torch.nn.Module) -> list[str]:
    """Magnitude 2:4 on every decoder Linear, in place; returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(name):
            module.weight.mul_(nm_keep_mask(module.weight.abs(), NMPattern(2, 4)))
            names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 32)")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU: verification and refusal only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else args.device)

    config = llama_config(args.smoke, args.layers)
    started = time.perf_counter()
    model = random_model(config, args.seed, args.threads)
    problem = accelerator_problem(device)
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
    result = measure(model, names, args.tokens, args.reps)
    for line in report_lines(result):
        print(line)
    result.update(
        environment=environment(args.device),
        decoder_layers=config.num_hidden_layers,
        parameters=sum(p.numel() for p in model.parameters()),
        backend=type(model.get_submodule(names[0]).weight).__name__,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_semi_structured.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
