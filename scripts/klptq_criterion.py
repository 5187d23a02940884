"""Does kl_ptq's criterion rank candidate grids as the layers' output error does? (SmolLM2, CPU)

For a few decoder blocks of SmolLM2-135M-Instruct, every targeted projection's candidate
grids (kl_ptq's outlier fractions x clip ratios at the given bits and group size) are scored
by each KL estimator of ``compress_kl_ptq.criterion`` and by the output error they cause on
real activations, ``tr(ΔW H ΔWᵀ)`` = ``‖(W − Ŵ)X‖²·2/N`` with ``H = 2/N Σ X Xᵀ`` collected by
``compress.api.collect_hessians`` over calibration windows of WikiText-2 valid. Per layer it
reports the Spearman rank correlation between each estimator and the output error across
the candidates, and the regret of each estimator's choice: the output error of the grid it
picks over the least output error among the candidates (1 = it picks the best grid).

The previous default estimator was ``gaussian`` (and ``histogram`` the nonparametric option);
``pointwise`` is the current default.

Usage::

    python -m scripts.klptq_criterion --blocks 2,20 --samples 16 --json docs/results/klptq_criterion.json
    python -m scripts.klptq_criterion --blocks 0 --samples 2 --seq-len 128 --smoke   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FRACTIONS = (0.0, 0.0025, 0.005, 0.01, 0.02)
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)


def layer_rows(name, weight, H, params, estimators) -> dict:
    """Scores of every candidate of one layer, their Spearman correlations and regrets."""
    from scipy.stats import spearmanr

    from compress.api import h_norms
    from compress_kl_ptq.method import criterion, trials

    w = weight.float()
    scores = {e: [] for e in estimators}
    errors, labels = [], []
    for trial in trials(name, w, params):
        for estimator in estimators:
            scores[estimator].append(criterion(w, trial, estimator, params.kl_bins))
        errors.append(h_norms(H, w - trial.quantized)[0])
        labels.append({"fraction": trial.split.fraction, "clip": trial.ratio, "bits": trial.split.bits})
    best = min(errors)
    row = {"layer": name, "candidates": labels, "output_error": errors, "scores": scores}
    row["spearman"] = {e: float(spearmanr(scores[e], errors).statistic) for e in estimators}
    row["regret"] = {e: errors[min(range(len(errors)), key=scores[e].__getitem__)] / best for e in estimators}
    row["best"] = labels[errors.index(best)]
    row["chosen"] = {e: labels[min(range(len(errors)), key=scores[e].__getitem__)] for e in estimators}
    return row


def within_fractions(row: dict, estimator: str) -> float:
    """Mean over outlier fractions of the Spearman correlation across clip ratios alone (how well
    the estimator picks the clip, without the easy ordering that more outliers bring)."""
    from scipy.stats import spearmanr

    fractions = sorted({c["fraction"] for c in row["candidates"]})
    correlations = []
    for fraction in fractions:
        index = [i for i, c in enumerate(row["candidates"]) if c["fraction"] == fraction]
        scores = [row["scores"][estimator][i] for i in index]
        correlations.append(spearmanr(scores, [row["output_error"][i] for i in index]).statistic)
    return sum(correlations) / len(correlations)


def table(rows: list[dict], estimators: list[str]) -> str:
    """Per layer: Spearman over all candidates, mean Spearman within a fraction, regret."""
    columns = [f"ρ {e}" for e in estimators] + [f"ρ clip {e}" for e in estimators]
    columns += [f"regret {e}" for e in estimators]
    lines = ["| layer | " + " | ".join(columns) + " |", "|" + " --- |" * (1 + len(columns))]
    for row in rows:
        cells = [f"{row['spearman'][e]:+.3f}" for e in estimators]
        cells += [f"{within_fractions(row, e):+.3f}" for e in estimators]
        cells += [f"{row['regret'][e]:.3f}" for e in estimators]
        lines.append(f"| {row['layer'].removeprefix('model.layers.')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="2,20")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--estimators", default="pointwise,gaussian,laplace,histogram")
    parser.add_argument("--smoke", action="store_true", help="two projections per block, 2 fractions x 3 clips")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="only tabulate a saved result")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(json.dumps(saved["settings"]))
        print(table(saved["layers"], list(saved["layers"][0]["scores"])))
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.api import collect_hessians
    from compress_kl_ptq.method import KLPTQParams
    from scripts.bench_ptq import DATA, model_dir, windows_of

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    estimators = args.estimators.split(",")
    fractions, clips, projections = FRACTIONS, CLIPS, PROJECTIONS
    if args.smoke:
        fractions, clips, projections = (0.0, 0.01), (1.0, 0.9, 0.7), PROJECTIONS[::6]
    params = KLPTQParams(
        bits=args.bits, group_size=args.group_size, outlier_fraction=list(fractions), clip_ratios=list(clips)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    windows = windows_of(DATA / "valid.txt", args.samples, args.seq_len, tokenizer)
    names = [f"model.layers.{b}.{p}" for b in args.blocks.split(",") for p in projections]
    layers = {name: model.get_submodule(name) for name in names}
    inputs = [((window.view(1, -1),), {}) for window in windows]
    hessians, _ = collect_hessians(model, layers, inputs, torch.device("cpu"))
    print(f"hessians from {args.samples}x{args.seq_len} tokens: {time.perf_counter() - started:.0f}s", flush=True)
    rows = []
    for name in names:
        row = layer_rows(name, layers[name].weight.data, hessians[name].matrix, params, estimators)
        rows.append(row)
        print(name, json.dumps({"spearman": row["spearman"], "regret": row["regret"], "best": row["best"]}), flush=True)

    print(table(rows, estimators))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {
            "bits": args.bits,
            "group_size": args.group_size,
            "fractions": fractions,
            "clips": clips,
            "calibration": f"{args.samples}x{args.seq_len} tokens of WikiText-2 valid",
            "seconds": time.perf_counter() - started,
            "command": "python -m scripts.klptq_criterion " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        args.json.write_text(json.dumps({"settings": settings, "layers": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
