"""PTQ benchmark: rtn, kl_ptq, gptq and kl_ptq→gptq against LLM Compressor (SmolLM2, CPU or GPU).

On SmolLM2-135M-Instruct (the converted safetensors directory in the compress cache) the
script quantizes the 7 projection types of every decoder block (q/k/v/o/gate/up/down;
lm_head, tied to the embeddings, is not touched) to W4 and W3, symmetric groups of 64,
with

* our methods, run through compress itself: a recipe file is generated per method and
  bit width (``output: null``, no ``evaluate:``), checked with
  ``compress.validate.check_recipe`` and run with ``compress.engine.apply_recipe``:
  ``rtn``, ``kl_ptq`` (data-free), ``gptq`` and ``kl_ptq`` then ``gptq`` with
  ``grid: inherit``. kl_ptq runs at equal storage: ``bits_per_weight`` = bits + 16/64, the
  exact figure of rtn and gptq at groups of 64 (4.25 at W4), with its default outlier
  fractions as candidates; at groups of 64 that budget admits no outliers (a clipped grid
  chosen by the KL criterion: the deployable variant, written as plain pack-quantized), so
  ``kl_ptq-g192`` (and ``kl_ptq-g192+gptq``) put the same budget into groups of 192
  (bits + 0.083) plus the outliers that fit (dense checkpoints only: no loadable format holds
  outliers, see the KLPTQ docstring); ``kl_ptq-gc`` (and ``kl_ptq-gc+gptq``) is the deployable
  g64 variant with ``clip_scope: group`` (each group's clip ratio chosen by the criterion);
  each run's exact figure is ``effective_bits``;
  ``--klptq-clips`` narrows the clip-ratio grid for slow machines;
* LLM Compressor (``--lc-python``: an interpreter that imports llmcompressor, by default this
  one): ``GPTQModifier`` through the sequential pipeline ``oneshot`` runs, fed the same
  calibration token windows in the same order (``scripts.bench_gptq_gpu.run_modifier``; no
  ``datasets`` package needed), with our gptq's settings given explicitly (block 128,
  dampening 0.01, ``actorder=None``: the modifier's default is ``"static"``; the settings
  it ran with are read back into ``settings``), and ``oneshot`` with
  ``QuantizationModifier`` (round-to-nearest, min-max observer), on the same model
  directory and the same targets.

Every configuration runs in its own child process (our ones with this interpreter, LLM
Compressor's with the other venv's), so wall time and peak memory are per configuration.
A child writes the dequantized weights of the targeted layers to a safetensors file;
this process loads them into one copy of the original model and evaluates every
configuration with the same function (``evaluate_windows``: torch + transformers only)
against the full-precision model's log-probabilities on the same tokens:

* perplexity and mean per-token KL(original ‖ quantized) of the next-token distributions
  on WikiText-2 test (in-domain: calibration is WikiText-2 valid);
* the same on Python source code from the standard library of this interpreter
  (``CODE_FILES``, concatenated in that order): out of domain for the calibration data.

Data: ``compress.data.TextFileSource`` (the loader recipes use: the text tokenized as one
stream, no special tokens, cut into consecutive non-overlapping windows); calibration
``--calib-samples`` x ``--seq-len`` tokens from WikiText-2 valid, evaluation
``--eval-samples`` x ``--seq-len`` tokens from each evaluation text; all models fp32, quantized
on ``--device`` and evaluated on ``--eval-device`` (default: the same).

Usage::

    python -m scripts.bench_ptq --lc-python /work/venv-lc/bin/python
    python -m scripts.bench_ptq --configs rtn,gptq --bits 4 --calib-samples 4 --eval-samples 1  # quick check
    python -m scripts.bench_ptq --device cuda --bits 4 --calib-samples 128 --eval-samples 96 --threads 16 \
        --configs rtn,kl_ptq,kl_ptq-gc,kl_ptq-g192,gptq,kl_ptq+gptq,kl_ptq-g192+gptq,llmc-gptq  # H100

LLM Compressor's children run ``python -m scripts.bench_ptq`` with ``--lc-python`` from the
repository root: this module imports only the standard library at the top, and
``scripts/__init__.py`` nothing.

The markdown table is printed; JSON goes to ``--json`` or ``$OUT/bench_ptq.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
TARGET_REGEX = r"re:.*(q|k|v|o|gate|up|down)_proj$"
GROUP_SIZE = 64
OURS = ("rtn", "kl_ptq", "gptq", "kl_ptq+gptq", "kl_ptq-g192", "kl_ptq-g192+gptq", "kl_ptq-gc", "kl_ptq-gc+gptq")
WIDE_GROUP = 192
"""Group size of the kl_ptq-g192 configurations (divides SmolLM2's widths 576 and 1536)."""
LLMC = ("llmc-rtn", "llmc-gptq")
CONFIGS = OURS + LLMC
CODE_FILES = ("textwrap.py", "functools.py", "argparse.py", "json/decoder.py", "collections/__init__.py")
GPTQ_SETTINGS = {"block_size": 128, "percdamp": 0.01, "act_order": False}


def model_dir() -> Path:
    """SmolLM2's converted safetensors directory in the compress cache (converted on first use)."""
    from compress.checkpoint.builtin import BuiltinLoader

    return BuiltinLoader().directory("smollm2-135m-instruct")


# --------------------------------------------------------------------------- shared evaluation
# Needs only torch and transformers: both venvs can import it.


def log_probs(model, window):
    """Next-token log-probabilities (float32) of one window of token ids, without the last position."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=window.view(1, -1)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def evaluate_windows(model, windows, reference):
    """Perplexity, mean KL(reference ‖ model) and top-1 agreement with the reference over windows;
    reference: list of log-prob tensors."""
    nll, kl, agree, tokens = 0.0, 0.0, 0, 0
    for window, ref in zip(windows, reference):
        lp = log_probs(model, window)
        labels = window[1:].view(-1, 1)
        nll += -lp.gather(-1, labels).sum().item()
        kl += (ref.exp() * (ref - lp)).sum().item()
        agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        tokens += labels.numel()
    return {"perplexity": math.exp(nll / tokens), "kl": kl / tokens, "top1": agree / tokens, "tokens": tokens}


class RSSSampler:
    """Peak resident set of this process, read from /proc every 20 ms (no psutil needed)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def save_targets(model, path: Path) -> int:
    """Write the targeted projections' (dequantized) weights, float32, to ``path``."""
    import re

    from safetensors.torch import save_file

    pattern = re.compile(TARGET_REGEX[3:])
    tensors = {
        f"{name}.weight": module.weight.detach().float().contiguous()
        for name, module in model.named_modules()
        if pattern.fullmatch(name) and hasattr(module, "weight")
    }
    save_file(tensors, str(path))
    return len(tensors)


# --------------------------------------------------------------------------- our methods (child)


def recipe_text(config: str, bits: int, calib: dict, clips: str | None = None, device: str = "cpu") -> str:
    stages = []
    calibration = config.endswith("gptq")
    group = WIDE_GROUP if config.startswith("kl_ptq-g192") else GROUP_SIZE
    common = f'    targets: ["{TARGET_REGEX}"]\n    bits: {bits}\n    group_size: {group}\n    symmetric: true\n'
    if config == "rtn":
        stages.append("  - method: rtn\n" + common)
    if config.startswith("kl_ptq"):
        budget = bits + 16 / GROUP_SIZE  # rtn's and gptq's exact storage at groups of GROUP_SIZE
        clip = f"    clip_ratios: [{clips}]\n" if clips else ""
        clip += "    clip_scope: group\n" if config.startswith("kl_ptq-gc") else ""
        stages.append("  - method: kl_ptq\n" + common + f"    bits_per_weight: {budget}\n    outlier_bits: 8\n" + clip)
    if calibration:
        extra = "".join(f"    {k}: {str(v).lower()}\n" for k, v in GPTQ_SETTINGS.items())
        grid = "    grid: inherit\n" if config.startswith("kl_ptq") else ""
        stages.append("  - method: gptq\n" + common + extra + grid)
    from scripts.common import benchmark_recipe

    return benchmark_recipe(model_dir(), "".join(stages), calib if calibration else None, device)


def run_ours(args) -> dict:
    from compress.engine import apply_recipe
    from scripts.common import checked_recipe

    recipe = Path(args.scratch) / f"{args.child}-w{args.bits}.yaml"
    text = recipe_text(args.child, args.bits, json.loads(args.calib), args.klptq_clips, args.device)
    host, checked = checked_recipe(recipe, text, args.threads)
    with RSSSampler() as total:
        context = apply_recipe(host, checked)
    totals = context.report.phases["stages"]
    result = {
        "config": args.child,
        "bits": args.bits,
        "recipe": recipe.read_text(),
        "quantize_seconds": totals["seconds"],  # run_stages: all stages (reference reload included)
        "stage_seconds": {s.name: s.seconds for s in context.report.stages},
        "apply_seconds": total.seconds,  # apply_recipe: load + stages
        "peak_rss_bytes": totals["peak_host_bytes"],
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["effective_bits"] = args.bits + 16 / GROUP_SIZE  # codes and fp16 scales; kl_ptq's own figure below
    for record in context.report.stages:
        layers = list(record.layers.values())
        if record.method == "kl_ptq" and layers:
            sizes = [context.model.get_submodule(n).weight.numel() for n in record.layers]
            result["effective_bits"] = sum(l["effective_bits"] * s for l, s in zip(layers, sizes)) / sum(sizes)
            result["outlier_fraction"] = sum(l["outlier_fraction"] * s for l, s in zip(layers, sizes)) / sum(sizes)
            result["clip_ratio_mean"] = sum(l["clip_ratio"] for l in layers) / len(layers)
        if record.method == "gptq" and layers:
            result["gptq_objective_mean"] = sum(l["objective"] for l in layers) / len(layers)
            result["gptq_rtn_objective_mean"] = sum(l["rtn_objective"] for l in layers) / len(layers)
    if args.child.endswith("gptq"):
        group = WIDE_GROUP if args.child.startswith("kl_ptq-g192") else GROUP_SIZE
        result["settings"] = {"bits": args.bits, "symmetric": True, "group_size": group, **GPTQ_SETTINGS}
    # no outliers: a plain grid, which the compressed-tensors writer stores as pack-quantized
    result["deployable"] = result.get("outlier_fraction", 0.0) == 0.0
    result["saved_layers"] = save_targets(context.model, Path(args.weights))
    return result


# --------------------------------------------------------------------------- LLM Compressor (child)


def run_llmc(args) -> dict:
    from scripts.bench_gptq_gpu import datasets_stand_in, run_modifier

    datasets_stand_in()
    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = str(model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    scheme = QuantizationScheme(targets=[TARGET_REGEX], weights=weights)
    if args.child == "llmc-gptq":
        # the same windows in the same order as our gptq, one per batch, through the sequential
        # pipeline oneshot() runs (scripts.bench_gptq_gpu.run_modifier: oneshot minus tokenizing a dataset)
        windows = torch.load(args.windows)
        loader = DataLoader(windows, batch_size=1, collate_fn=lambda batch: {"input_ids": torch.stack(batch)})
        # GPTQModifier's own default is actorder "static": given explicitly, as ours runs without
        modifier = GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=["lm_head"],
            block_size=GPTQ_SETTINGS["block_size"],
            dampening_frac=GPTQ_SETTINGS["percdamp"],
            actorder=None,
        )
        with RSSSampler() as usage:
            run_modifier(model, modifier, loader, torch.device(args.device))
    else:
        modifier = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
        with RSSSampler() as usage:
            oneshot(model=model, tokenizer=tokenizer, recipe=[modifier])
    # the fake-quantized (dequantized) weights, as compressed-tensors' forward computes them
    quantized, applied = 0, None
    with torch.no_grad():
        for _name, module in model.named_modules():
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None or qscheme.weights is None:
                continue
            zero = getattr(module, "weight_zero_point", None)
            module.weight.data = fake_quantize(module.weight, module.weight_scale, zero, qscheme.weights)
            quantized, applied = quantized + 1, qscheme.weights
    return {
        "config": args.child,
        "bits": args.bits,
        "effective_bits": args.bits + 16 / GROUP_SIZE,
        "llmcompressor_modifier": repr(modifier)[:2000],
        "quantize_seconds": usage.seconds,  # oneshot() only
        "peak_rss_bytes": usage.peak,
        # ru_maxrss survives execve on Linux: a child starts at the driver's high-water mark,
        # so this is an upper bound only; peak_rss_bytes is the figure to compare.
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "quantized_modules": quantized,
        # the settings after the modifier resolved them, read back from a quantized layer
        "settings": {
            "bits": applied.num_bits,
            "symmetric": applied.symmetric,
            "group_size": applied.group_size,
            "act_order": getattr(applied.actorder, "value", applied.actorder) or "off",
            "observer": applied.observer,
        },
        "saved_layers": save_targets(model, Path(args.weights)),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "compressed_tensors": __import__("compressed_tensors").__version__,
        },
    }


# --------------------------------------------------------------------------- driver


def code_text(scratch: Path) -> tuple[Path, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in CODE_FILES]
    out = scratch / "python_stdlib.txt"
    out.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in files), encoding="utf-8")
    return out, [str(f) for f in files]


def windows_of(path: Path, samples: int, seq_len: int, tokenizer):
    """The token windows (1-D tensors) the ``text`` data source makes of ``path``."""
    from compress.data import TextFileSource
    from compress.recipe import DataSpec

    loaded = TextFileSource().load(DataSpec(path=path, samples=samples, seq_len=seq_len), tokenizer)
    return [sample["input_ids"] for sample in loaded]


def environment(lc_python: str | None) -> dict:
    import torch
    import transformers

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
    }
    with contextlib.suppress(ValueError, OSError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if lc_python:
        code = (
            "import llmcompressor, compressed_tensors, torch, transformers, platform; print(platform.python_version(),"
            " llmcompressor.__version__, compressed_tensors.__version__, torch.__version__, transformers.__version__)"
        )
        out = subprocess.run([lc_python, "-c", code], capture_output=True, text=True, check=False).stdout.split()
        if len(out) == 5:
            info["llmcompressor_env"] = dict(
                zip(("python", "llmcompressor", "compressed_tensors", "torch", "transformers"), out)
            )
    return info


def fmt_row(r: dict) -> str:
    def f(key, spec):
        return format(r[key], spec) if r.get(key) is not None else "–"

    group = WIDE_GROUP if r["config"].startswith("kl_ptq-g192") else GROUP_SIZE
    bits = "fp32" if r["config"] == "full precision" else f"W{r['bits']} g{group}"
    eff = f"{r['effective_bits']:.4f}" if r.get("effective_bits") else "–"
    return (
        f"| {r['config']} | {bits} | {eff} | {f('wiki_ppl', '.2f')} | {f('wiki_kl', '.4f')} | {f('code_ppl', '.3f')} "
        f"| {f('code_kl', '.4f')} | {f('quantize_seconds', '.1f')} "
        f"| {r['peak_rss_bytes'] / 2**30:.2f} |"
        if r.get("peak_rss_bytes")
        else f"| {r['config']} | {bits} | {eff} | {f('wiki_ppl', '.2f')} | {f('wiki_kl', '.4f')} | {f('code_ppl', '.3f')} "
        f"| {f('code_kl', '.4f')} | – | – |"
    )


def table(results: list[dict], wiki_tokens: int, code_tokens: int) -> str:
    head = (
        "| method | scheme | eff. bits | WikiText-2 ppl | WikiText-2 KL | Python code ppl | Python code KL "
        "| quantize wall (s) | peak RSS in run (GiB) |"
    )
    return "\n".join([head, "|" + " --- |" * 9] + [fmt_row(r) for r in results])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lc-python", default=sys.executable, help="python that imports llmcompressor (default: this one)"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="where the methods run (ours and LLM Compressor's GPTQ)")
    parser.add_argument("--eval-device", default=None, help="where the evaluation runs (default: --device)")
    parser.add_argument("--klptq-clips", default=None, help="kl_ptq clip ratios, comma-separated (default: its grid)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    for hidden in ("--scratch", "--weights", "--result", "--calib", "--windows"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.bits = [int(b) for b in str(args.bits).split(",")] if args.child is None else int(args.bits)

    if args.child:
        result = run_ours(args) if args.child in OURS else run_llmc(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    env = environment(args.lc_python if any(c in LLMC for c in configs) else None)
    print(json.dumps(env), flush=True)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench_ptq_"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    calib = {"path": str(DATA / "valid.txt"), "samples": args.calib_samples, "seq_len": args.seq_len}
    calib_windows = windows_of(DATA / "valid.txt", args.calib_samples, args.seq_len, tokenizer)
    torch.save(calib_windows, scratch / "calib.pt")
    code_path, code_files = code_text(scratch)
    evals = {
        "wiki": windows_of(DATA / "test.txt", args.eval_samples, args.seq_len, tokenizer),
        "code": windows_of(code_path, args.eval_samples, args.seq_len, tokenizer),
    }
    eval_device = torch.device(args.eval_device or args.device)
    evals = {key: [w.to(eval_device) for w in ws] for key, ws in evals.items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.to(eval_device)
    reference = {k: [log_probs(model, w) for w in ws] for k, ws in evals.items()}
    fp = {"config": "full precision", "bits": None}
    for key, ws in evals.items():
        m = evaluate_windows(model, ws, reference[key])
        fp[f"{key}_ppl"], fp[f"{key}_kl"], fp[f"{key}_tokens"] = m["perplexity"], m["kl"], m["tokens"]
    print(f"full precision: {fp}", flush=True)
    results = [fp]

    for bits in args.bits:
        for config in configs:
            weights, result_file = scratch / f"{config}-w{bits}.safetensors", scratch / f"{config}-w{bits}.json"
            python = args.lc_python if config in LLMC else sys.executable
            command = [
                python,
                "-m",
                "scripts.bench_ptq",
                "--child",
                config,
                "--bits",
                str(bits),
                "--scratch",
                str(scratch),
                "--weights",
                str(weights),
                "--result",
                str(result_file),
                "--calib",
                json.dumps(calib),
                "--windows",
                str(scratch / "calib.pt"),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                *(["--klptq-clips", args.klptq_clips] if args.klptq_clips else []),
            ]
            t0 = time.perf_counter()
            code = subprocess.run(command, cwd=ROOT, check=False).returncode
            if code or not result_file.exists():
                print(f"{config} W{bits}: child failed (exit {code})", file=sys.stderr, flush=True)
                results.append({"config": config, "bits": bits, "failed": code})
                continue
            result = json.loads(result_file.read_text())
            result["child_seconds"] = time.perf_counter() - t0
            state = load_file(str(weights))
            model.load_state_dict(state, strict=False)
            changed = sum(not torch.equal(state[k], original[k].to(state[k].device)) for k in state)
            result["layers_changed"] = changed
            for key, ws in evals.items():
                m = evaluate_windows(model, ws, reference[key])
                result[f"{key}_ppl"], result[f"{key}_kl"] = m["perplexity"], m["kl"]
            model.load_state_dict(original)
            weights.unlink()
            result["load_average_after"] = os.getloadavg()
            print(
                f"{config} W{bits}: "
                + json.dumps({k: v for k, v in result.items() if k not in ("recipe", "llmcompressor_modifier")}),
                flush=True,
            )
            results.append(result)

    env["load_average_end"] = os.getloadavg()
    env["total_seconds"] = time.perf_counter() - started
    wiki_tokens, code_tokens = fp["wiki_tokens"], fp["code_tokens"]
    print(
        f"\nSmolLM2-135M-Instruct fp32, {env.get('gpu', 'CPU')} ({env['cpu']}, {args.threads} threads); calibration "
        f"{args.calib_samples}x{args.seq_len} tokens of WikiText-2 valid; evaluation {args.eval_samples}x{args.seq_len} "
        f"tokens (context {args.seq_len}, {wiki_tokens} / {code_tokens} predicted tokens) of WikiText-2 test / "
        f"Python stdlib code ({', '.join(CODE_FILES)})"
    )
    print(table(results, wiki_tokens, code_tokens))
    out = args.json or (Path(os.environ["OUT"]) / "bench_ptq.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m scripts.bench_ptq " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(
            json.dumps(
                {
                    "environment": env,
                    "command": command.strip(),
                    "code_files": code_files,
                    "calibration": calib,
                    "eval_samples": args.eval_samples,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
