"""One-shot sparsity quality benchmark: magnitude, wanda, sparsegpt against LLM Compressor (SmolLM2, CPU or GPU).

On SmolLM2-135M-Instruct (fp32, the converted safetensors directory in the compress cache)
the 7 projection types of every decoder block (q/k/v/o/gate/up/down; lm_head, tied to the
embeddings, is not touched) are pruned to 2:4, 4:8 and 50 % unstructured with

* our methods, run through compress itself (a generated recipe, ``check_recipe`` then
  ``apply_recipe``, ``output: null``): ``magnitude``, ``wanda``, ``sparsegpt``, and
  ``sparsegpt`` 2:4 + W4 (symmetric groups of 64, quantized in the same pass);
* LLM Compressor's ``SparseGPTModifier`` (block_size 128, dampening_frac 0.01) and
  ``WandaPruningModifier`` through its sequential pipeline (``oneshot`` minus model loading
  and tokenization), on the same model directory, targets and calibration token windows
  (``mask_structure`` "2:4"/"4:8" with sparsity 0.5, or "0:0" for unstructured). LLM
  Compressor is not installed in compress's environment: its wheels are unpacked into a
  directory of their own (``--lc-site``, e.g. ``pip install --no-deps --target
  /tmp/lc-site .whl-lc/*.whl``) that only its child gets on ``PYTHONPATH``.

Unstructured 50 % compares each method's own default: per layer for magnitude, per output
row for Wanda (both implementations), per 128-column block over the whole layer for
SparseGPT (both implementations).

Two child processes prune: one runs our configurations one after the other, the other LLM
Compressor's (one interpreter start each). On CUDA they run at the same time, sharing the
GPU (the prune times are then those of a shared GPU: the speed comparison is
``scripts.bench_sparsegpt_gpu``'s); on the CPU one after the other (``--parallel`` /
``--serial`` override). A child writes each configuration's targeted weights; this process
loads them into one copy of the original model and evaluates every configuration with the
same function (``scripts.common.evaluate_domains``) against the original model's
log-probabilities on the same tokens: perplexity, mean per-token KL(original ‖ pruned) and
top-1 agreement, on WikiText-2 test (calibration is WikiText-2 valid) and on Python source
code of this interpreter's standard library (``scripts.bench_ptq.CODE_FILES``; out of domain).

Usage::

    python -m scripts.bench_sparse --lc-site /tmp/lc-site
    python -m scripts.bench_sparse --smoke   # 2 calibration, 1 evaluation window of 128 tokens, 3 configs
    PYTHONPATH=/tmp/site:.:plugins python -m scripts.bench_sparse --device cuda --lc-site /tmp/site \\
        --calib-samples 128 --seq-len 512 --eval-samples 32 --json $OUT/bench_sparse_gpu.json   # H100: ~5 min

The markdown table is printed; JSON goes to ``--json`` (default docs/results/bench_sparse_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from scripts.bench_ptq import (
    DATA,
    TARGET_REGEX,
    RSSSampler,
    code_text,
    environment,
    log_probs,
    model_dir,
    save_targets,
    windows_of,
)

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = {"2of4": ("2:4", None), "4of8": ("4:8", None), "u50": (None, 0.5)}
OURS = {
    f"{method}-{key}": (method, pattern, sparsity, None)
    for method in ("magnitude", "wanda", "sparsegpt")
    for key, (pattern, sparsity) in PATTERNS.items()
}
OURS["sparsegpt-2of4-w4"] = ("sparsegpt", "2:4", None, 4)
LLMC = {
    f"llmc-{method}-{key}": (method, pattern, sparsity, False)
    for method in ("sparsegpt", "wanda")
    for key, (pattern, sparsity) in PATTERNS.items()
}
LLMC |= {f"llmc-sparsegpt-{key}-rev": (*LLMC[f"llmc-sparsegpt-{key}"][:3], True) for key in ("2of4", "u50")}
"""``-rev``: the same calibration windows in reverse order, so the same Hessians up to float
summation order: the spread between a configuration and its ``-rev`` twin is the run-to-run
noise that float-level differences cause through the discrete mask choices (not run by default)."""
DEFAULT_CONFIGS = [config for config in (*OURS, *LLMC) if not config.endswith("-rev")]
CONFIGS = list(OURS) + list(LLMC)
SMOKE = ("magnitude-2of4", "sparsegpt-2of4", "llmc-sparsegpt-2of4")
SPARSEGPT = {"block_size": 128, "percdamp": 0.01}
GROUP_SIZE = 64


def recipe_text(config: str, calib: dict, device: str) -> str:
    """The recipe of one of our configurations."""
    from scripts.common import benchmark_recipe

    method, pattern, sparsity, bits = OURS[config]
    lines = [f"  - method: {method}", f'    targets: ["{TARGET_REGEX}"]']
    lines.append(f'    pattern: "{pattern}"' if pattern else f"    sparsity: {sparsity}")
    if method == "sparsegpt":
        lines += [f"    {key}: {value}" for key, value in SPARSEGPT.items()]
    if bits:
        lines += [f"    bits: {bits}", f"    group_size: {GROUP_SIZE}", "    symmetric: true"]
    stages = "".join(line + "\n" for line in lines)
    return benchmark_recipe(model_dir(), stages, None if method == "magnitude" else calib, device)


def run_ours(args, config: str, host=None) -> tuple[dict, object]:
    """One of our configurations; returns its result and the plugin host (reused by the next)."""
    from compress.engine import apply_recipe
    from scripts.common import checked_recipe

    recipe = Path(args.scratch) / f"{config}.yaml"
    host, checked = checked_recipe(recipe, recipe_text(config, json.loads(args.calib), args.device), args.threads, host)
    with RSSSampler() as usage:
        context = apply_recipe(host, checked)
    layers = [layer for record in context.report.stages for layer in record.layers.values()]
    result = {
        "config": config,
        "recipe": recipe.read_text(),
        "prune_seconds": context.report.phases["stages"]["seconds"],
        "peak_rss_bytes": usage.peak,
        "saved_layers": save_targets(context.model, Path(args.scratch) / f"{config}.safetensors"),
    }
    if layers and "objective" in layers[0]:
        result["objective_mean"] = sum(layer["objective"] for layer in layers) / len(layers)
        result["magnitude_objective_mean"] = sum(layer["magnitude_objective"] for layer in layers) / len(layers)
    return result, host


def run_llmc(args, config: str) -> dict:
    from scripts.bench_gptq_gpu import datasets_stand_in

    datasets_stand_in()  # the GPU image has no datasets; the calibration goes in as a DataLoader
    import llmcompressor
    import torch
    from llmcompressor.args import DatasetArguments, RecipeArguments
    from llmcompressor.entrypoints.oneshot import Oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method, pattern, sparsity, reverse = LLMC[config]
    path = str(model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(args.device)
    # LLM Compressor's "N:M" counts the zeros of every M: 2:4 and 4:8 keep half, as ours
    structure = {"2:4": "2:4", "4:8": "4:8", None: "0:0"}[pattern]
    common = {"sparsity": 0.5 if sparsity is None else sparsity, "mask_structure": structure}
    common |= {"targets": [TARGET_REGEX], "ignore": ["lm_head"]}
    if method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=SPARSEGPT["block_size"], dampening_frac=SPARSEGPT["percdamp"])
    else:
        modifier = WandaPruningModifier(**common)
    windows = torch.load(args.windows)
    windows = windows[::-1] if reverse else windows
    loader = DataLoader(windows, batch_size=1, collate_fn=lambda b: {"input_ids": torch.stack(b)})
    # oneshot() minus loading the model from a path and tokenizing a dataset (as bench_gptq_gpu)
    shot = Oneshot.__new__(Oneshot)
    shot.model, shot.recipe = model, [modifier]
    shot.recipe_args = RecipeArguments(recipe=[modifier])
    shot.dataset_args = DatasetArguments(pipeline="sequential")
    with RSSSampler() as usage:
        shot.apply_recipe_modifiers(calibration_dataloader=loader)
    return {
        "config": config,
        "llmcompressor_modifier": repr(modifier)[:2000],
        "prune_seconds": usage.seconds,
        "peak_rss_bytes": usage.peak,
        "saved_layers": save_targets(model, Path(args.scratch) / f"{config}.safetensors"),
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__},
    }


def run_children(args) -> int:
    """The child: run each configuration of ``--child`` (a comma-separated list) in turn, writing
    ``SCRATCH/CONFIG.json`` and ``.safetensors``; a configuration that raises is reported and
    skipped. Returns how many failed."""
    import traceback

    host, failed = None, 0
    for config in args.child.split(","):
        try:
            if config in OURS:
                result, host = run_ours(args, config, host)
            else:
                result = run_llmc(args, config)
        except Exception:
            traceback.print_exc()
            print(f"{config}: failed", file=sys.stderr, flush=True)
            failed += 1
            continue
        (Path(args.scratch) / f"{config}.json").write_text(json.dumps(result))
    return failed


def start_child(args, configs: list[str], scratch: Path, calib: dict) -> subprocess.Popen:
    """A child process pruning ``configs`` (all ours or all LLM Compressor's) one after the other."""
    command = [sys.executable, "-m", "scripts.bench_sparse", "--child", ",".join(configs)]
    command += ["--threads", str(args.threads), "--scratch", str(scratch), "--calib", json.dumps(calib)]
    command += ["--windows", str(scratch / "calib.pt"), "--device", args.device]
    env = dict(os.environ)
    if configs[0] in LLMC:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.lc_site, str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(command, cwd=ROOT, env=env)


def pruned(args, configs: list[str], scratch: Path, calib: dict) -> Iterator[tuple[str, int | None]]:
    """Run our configurations and LLM Compressor's in two children (at the same time if
    ``args.parallel``) and yield each configuration as soon as its child has written it, with
    None, or, once its child has exited without writing it, with the child's exit code."""
    batches = [batch for batch in ([c for c in configs if c in OURS], [c for c in configs if c in LLMC]) if batch]
    running: list[tuple[list[str], subprocess.Popen]] = []
    while batches or running:
        if batches and (args.parallel or not running):
            batch = batches.pop(0)
            running.append((batch, start_child(args, batch, scratch, calib)))
        for batch, process in list(running):
            code = process.poll()
            while batch and (scratch / f"{batch[0]}.json").exists():
                yield batch.pop(0), None
            if code is not None:
                running.remove((batch, process))
                yield from ((config, code) for config in batch)
        time.sleep(1)


def zeros(state: dict) -> float:
    total = sum(t.numel() for t in state.values())
    return sum(int((t == 0).sum()) for t in state.values()) / total


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    head = (
        "| configuration | zeros | WikiText-2 ppl | WikiText-2 KL | WikiText-2 top-1 | code ppl | code KL "
        "| code top-1 | prune wall (s) |"
    )
    rows = [head, "|" + " --- |" * 9]
    for r in results:
        if r.get("failed") is not None:
            rows.append(f"| {r['config']} | failed (exit {r['failed']}) |" + " |" * 7)
            continue
        rows.append(
            f"| {r['config']} | {fmt(r.get('zeros'), '.3f')} | {r['wiki_ppl']:.2f} | {r['wiki_kl']:.4f} "
            f"| {r['wiki_top1']:.3f} | {r['code_ppl']:.3f} | {r['code_kl']:.4f} | {r['code_top1']:.3f} "
            f"| {fmt(r.get('prune_seconds'), '.0f')} |"
        )
    return "\n".join(rows)


def save(args, argv, env: dict, code_files: list[str], calib: dict, results: list[dict]) -> None:
    """Write the JSON record (after every configuration, so a cut-short run keeps what it measured)."""
    if args.json is None or args.smoke:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m scripts.bench_sparse " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"environment": env, "command": command.strip(), "code_files": code_files, "calibration": calib}
    payload |= {"device": args.device, "eval_samples": args.eval_samples, "seq_len": args.seq_len}
    payload["concurrent_children"] = args.parallel
    args.json.write_text(json.dumps(payload | {"results": results}, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lc-site", default=None, help="directory holding llmcompressor and its pinned deps")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: faster on a shared CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU run of the same comparison")
    parser.add_argument("--smoke", action="store_true", help="2 calibration and 1 evaluation window of 128 tokens")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_sparse_cpu.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--parallel", action="store_true", default=None, help="prune in both children at once")
    mode.add_argument("--serial", dest="parallel", action="store_false", help="one child after the other")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--scratch", "--calib", "--windows"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return 1 if run_children(args) else 0
    if args.parallel is None:
        args.parallel = args.device.startswith("cuda")
    unknown = [c.strip() for c in args.configs.split(",") if c.strip() and c.strip() not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations: {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if args.smoke:
        args.calib_samples, args.eval_samples, args.seq_len = 2, 1, 128
        args.configs = ",".join(SMOKE)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.lc_site is None:
        configs = [c for c in configs if c not in LLMC]
        print("no --lc-site: LLM Compressor's configurations are skipped", flush=True)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scripts.common import evaluate_domains

    torch.set_num_threads(args.threads)
    env = environment(None)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench_sparse_"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    calib = {"path": str(DATA / "valid.txt"), "samples": args.calib_samples, "seq_len": args.seq_len}
    torch.save(windows_of(DATA / "valid.txt", args.calib_samples, args.seq_len, tokenizer), scratch / "calib.pt")
    code_path, code_files = code_text(scratch)
    evals = {
        key: [window.to(args.device) for window in windows_of(path, args.eval_samples, args.seq_len, tokenizer)]
        for key, path in (("wiki", DATA / "test.txt"), ("code", code_path))
    }
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval().to(args.device)
    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    reference = {key: [log_probs(model, w) for w in windows] for key, windows in evals.items()}
    dense = {"config": "dense"} | evaluate_domains(model, evals, reference)
    print(f"dense: {json.dumps(dense)}", flush=True)
    results = [dense]
    for config, code in pruned(args, configs, scratch, calib):
        result_file, weights = scratch / f"{config}.json", scratch / f"{config}.safetensors"
        if code is not None:
            print(f"{config}: no result (its child exited {code})", file=sys.stderr, flush=True)
            results.append({"config": config, "failed": code})
            continue
        result = json.loads(result_file.read_text())
        state = load_file(str(weights), device=args.device)
        result["zeros"] = zeros(state)
        model.load_state_dict(state, strict=False)
        result |= evaluate_domains(model, evals, reference)
        model.load_state_dict(original)
        weights.unlink()
        print(
            f"{config}: "
            + json.dumps({k: v for k, v in result.items() if k not in ("recipe", "llmcompressor_modifier")}),
            flush=True,
        )
        results.append(result)
        save(args, argv, env, code_files, calib, results)

    results = [dense, *sorted(results[1:], key=lambda r: configs.index(r["config"]))]
    env["load_average_end"] = os.getloadavg()
    env["total_seconds"] = time.perf_counter() - started
    print(
        f"\nSmolLM2-135M-Instruct fp32, {args.device} ({env['cpu']}, {args.threads} threads); calibration "
        f"{args.calib_samples}x{args.seq_len} tokens of WikiText-2 valid; evaluation {args.eval_samples}x{args.seq_len} "
        f"tokens of WikiText-2 test and of Python stdlib code"
    )
    print(table(results))
    save(args, argv, env, code_files, calib, results)
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
