"""kl_ptq time per decoder layer at Llama-3-8B shape (data-free: no forward pass, weights only).

The seven projections of one decoder layer of Llama-3-8B's published shape (``scripts.common``:
q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336), bf16 N(0, 0.02) weights,
are quantized by ``compress_kl_ptq.method.quantize_layer`` on the device (W4, symmetric
groups of 128, ``bits_per_weight`` 4.25: codes and scales take 4.125, the rest is left to
outliers; the default outlier fractions and clip ratios as candidates). The first layer is a
warm-up; the median over ``--repeats`` layers is reported, with every projection's time,
the candidates tried, and peak GPU memory. Random weights give honest timings (the work does
not depend on the values) but meaningless quality numbers.

Usage::

    PYTHONPATH=.:plugins python -m scripts.bench_klptq_gpu --json docs/results/bench_klptq_gpu.json
    python -m scripts.bench_klptq_gpu --tiny --device cpu --repeats 1   # a small shape on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one decoder layer of ``config``."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def one_layer(shapes, params, device, seed: int) -> dict:
    """Seconds per projection (synchronised) and the candidates each tried."""
    import torch

    from compress_kl_ptq.method import quantize_layer

    times, candidates = {}, {}
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in shapes.items():
        weight = (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        report = quantize_layer(name, weight, params).report()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - start
        candidates[name] = report["candidates"]
        del weight
    return {"seconds": times, "total": sum(times.values()), "candidates": candidates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the small shape of scripts.common")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from compress_kl_ptq.method import KLPTQParams
    from scripts.common import environment, llama_config

    device = torch.device(args.device)
    shapes = projection_shapes(llama_config(args.tiny, 1))
    params = KLPTQParams(bits=4, group_size=128, bits_per_weight=4.25)
    one_layer(shapes, params, device, seed=0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    layers = [one_layer(shapes, params, device, seed=1 + i) for i in range(args.repeats)]
    median = statistics.median(layer["total"] for layer in layers)
    result = {
        "environment": environment(args.device),
        "shapes": shapes,
        "params": params.model_dump(),
        "layers": layers,
        "median_seconds_per_layer": median,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "params")}, indent=1))
    print(f"kl_ptq: {median:.2f} s per decoder layer (median of {args.repeats}) on {args.device}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
