"""Output formats benchmark: bytes on disk, load time, generate speed and quality vs bf16.

SmolLM2-135M-Instruct is written by ``compress`` itself in five formats, each from a
generated recipe (``compress.validate.check_recipe`` + ``compress.engine.apply_recipe``,
model ``smollm2-135m-instruct`` loaded with ``dtype: bfloat16``):

- ``bf16``: the dense writer, no stage (the baseline);
- ``ct-w4a16-g64``: ``rtn`` 4-bit symmetric groups of 64, ``compressed-tensors`` pack-quantized;
- ``ct-w8a16-ch``: ``rtn`` 8-bit symmetric per output channel, ``compressed-tensors``;
- ``bnb-nf4``: ``bitsandbytes`` nf4, double quantization, blocks of 64;
- ``bnb-int8``: ``bitsandbytes`` LLM.int8.

For each written checkpoint the script measures

- bytes on disk (``compress.checkpoint.inspect.inspect_checkpoint``): the whole
  checkpoint and the Linear layers alone, each against the same tensors in bf16;
- load time: ``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`` onto the
  device (median of ``--load-reps``; the files are in the page cache after the first);
- generate throughput in transformers: greedy, a fixed prompt repeated ``batch`` times,
  exactly ``--new-tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``), one
  warm-up call first, median of ``--gen-reps``; tokens/s = batch x new tokens / wall
  time (prefill of the short prompt included);
- quality: mean per-token KL(bf16 || format) of the next-token distributions on
  ``--kl-samples`` x ``--kl-seq-len`` WikiText-2 test tokens, top-1 agreement with
  bf16, and how many of the batch-1 greedy tokens equal bf16's.

On CUDA it also times 2:4 semi-structured sparse Linear layers
(``torch.sparse.to_sparse_semi_structured``, fp16) against dense ``F.linear`` on the
same 2:4-pruned weights at SmolLM2 and Llama-3-8B shapes, inside CUDA graphs (eager
sparse calls carry a fixed host overhead that would hide the kernel on Hopper), with
the sparse output checked against the dense one. On the CPU that part is skipped
(the semi-structured kernels are CUDA-only).

Usage::

    python -m scripts.bench_formats                 # CUDA when present: batch 1 and 16, 128 new tokens, 2:4 kernels
    python -m scripts.bench_formats --device cpu    # CPU: batch 1 and 4, 16 new tokens, no 2:4 part

Results are printed as markdown tables and written as JSON to ``--json`` or, when the
environment variable OUT is set, to ``$OUT/bench_formats.json``. Needs
``COMPRESS_CACHE`` (or the default cache) holding, or able to build, the converted
SmolLM2, and bitsandbytes and compressed-tensors installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scripts.common import environment as common_environment

ROOT = Path(__file__).resolve().parents[1]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes logs on every LLM.int8 call with bf16 inputs (they are cast to fp16).
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropMessage("MatMul8bitLt: inputs will be cast"))

MODEL = "smollm2-135m-instruct"
TARGETS = ["re:.*(q|k|v|o|gate|up|down)_proj$"]
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden press. Explain in a few "
    "sentences why this invention changed how knowledge spread across Europe."
)

# name -> (stages, output options beyond dir/format, format)
FORMATS: dict[str, tuple[list[dict], str, dict]] = {
    "bf16": ([], "dense", {}),
    "ct-w4a16-g64": (
        [{"method": "rtn", "targets": TARGETS, "bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}],
        "compressed-tensors",
        {},
    ),
    "ct-w8a16-ch": (
        [{"method": "rtn", "targets": TARGETS, "bits": 8, "symmetric": True, "granularity": "channel"}],
        "compressed-tensors",
        {},
    ),
    "bnb-nf4": ([], "bitsandbytes", {"quant_type": "nf4", "double_quant": True, "blocksize": 64}),
    "bnb-int8": ([], "bitsandbytes", {"quant_type": "int8"}),
}

# (name, out_features, in_features) of real Linear layers
SPARSE_SHAPES = [
    ("SmolLM2 q_proj/o_proj", 576, 576),
    ("SmolLM2 gate/up_proj", 1536, 576),
    ("SmolLM2 down_proj", 576, 1536),
    ("Llama-3-8B q_proj/o_proj", 4096, 4096),
    ("Llama-3-8B gate/up_proj", 14336, 4096),
    ("Llama-3-8B down_proj", 4096, 14336),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- checkpoints


def write_checkpoints(names: list[str], workdir: Path, reuse: bool = False) -> dict[str, dict]:
    """Each format written by compress from a generated recipe; name -> {dir, seconds}."""
    import yaml

    from compress.engine import apply_recipe
    from compress.host import PluginHost
    from compress.validate import check_recipe

    host = PluginHost()
    host.load_plugins()
    if "rtn" not in host.methods():  # no entry points without an installed distribution
        import compress_rtn

        host.register(compress_rtn, name="rtn")
    written = {}
    for name in names:
        stages, fmt, options = FORMATS[name]
        out_dir = workdir / "checkpoints" / name
        recipe = {
            "model": {"name": MODEL, "dtype": "bfloat16"},
            "stages": stages,
            "output": {"dir": str(out_dir), "format": fmt, **options},
            "run": {"device": "cpu"},  # rtn is data-free and the model is small
        }
        recipe_file = workdir / "recipes" / f"{name}.yaml"
        reusable = reuse and (out_dir / "config.json").is_file() and recipe_file.is_file()
        if reusable and yaml.safe_load(recipe_file.read_text()) == recipe:
            print(f"[write] {name}: reusing {out_dir}", flush=True)
            written[name] = {"dir": out_dir, "seconds": None, "recipe": recipe}
            continue
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        start = time.perf_counter()
        checked = check_recipe(host, recipe_file)
        apply_recipe(host, checked, overwrite=True)
        seconds = time.perf_counter() - start
        print(f"[write] {name}: {out_dir} in {seconds:.1f} s", flush=True)
        written[name] = {"dir": out_dir, "seconds": seconds, "recipe": recipe}
    return written


def disk_summary(directory: Path) -> dict:
    from compress.checkpoint.inspect import inspect_checkpoint, storage_groups

    summary = inspect_checkpoint(directory)
    linear_disk = sum(layer.disk_bytes for layer in summary.layers)
    linear_bf16 = sum(layer.bf16_bytes for layer in summary.layers)
    return {
        "format": summary.format,
        "disk_bytes": summary.disk_bytes,
        "bf16_bytes": summary.bf16_bytes,
        "ratio": summary.disk_bytes / summary.bf16_bytes,
        "linear_disk_bytes": linear_disk,
        "linear_bf16_bytes": linear_bf16,
        "linear_ratio": summary.linear_ratio(),
        "linear_layers": len(summary.layers),
        "storage": {kind: len(layers) for kind, layers in storage_groups(summary).items()},
        "files_bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors")),
    }


# --------------------------------------------------------------------------- loading, generating


def load(directory: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return model.eval()


@torch.inference_mode()
def timed_loads(directory: Path, device: torch.device, reps: int):
    """Seconds of ``from_pretrained`` and of it plus a first one-token forward, per load.

    The second counts work deferred to the first call: transformers' compressed-tensors
    integration (on the CPU, at least) decompresses the packed weights to dense ones on
    the model's first forward, not inside ``from_pretrained``.
    """
    seconds, ready = [], []
    model = None
    token = torch.tensor([[1]], device=device)
    for _ in range(reps):
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sync(device)
        start = time.perf_counter()
        model = load(directory, device)
        sync(device)
        seconds.append(time.perf_counter() - start)
        model(token)
        sync(device)
        ready.append(time.perf_counter() - start)
    return model, seconds, ready


def linear_classes(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            kind = type(module).__module__.split(".")[0] + "." + type(module).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@torch.inference_mode()
def generate_speed(model, tokenizer, device, batch: int, new_tokens: int, reps: int) -> dict:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device).repeat(batch, 1)
    mask = torch.ones_like(ids)
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.eos_token_id,
    }
    model.generate(ids, **{**kwargs, "max_new_tokens": min(4, new_tokens), "min_new_tokens": min(4, new_tokens)})
    seconds, out = [], None
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
    generated = out[:, ids.shape[1] :]
    assert generated.shape == (batch, new_tokens), generated.shape
    median = statistics.median(seconds)
    return {
        "batch": batch,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": batch * new_tokens / median,
        "tokens": generated[0].tolist(),
    }


def kl_tokens(tokenizer, path: Path, samples: int, seq_len: int) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")[: 200 * samples * seq_len]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = samples * seq_len
    if ids.numel() < need:
        raise SystemExit(f"{path}: {ids.numel()} tokens, need {need}")
    return ids[:need].view(samples, seq_len)


@torch.inference_mode()
def log_probs(model, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = []
    for row in tokens:  # one sequence at a time: modest memory
        logits = model(row[None].to(device)).logits[0].float()
        rows.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.stack(rows)


def quality(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - candidate)).sum(-1)  # per position, nats
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float()
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(), "top1_agreement": top1.mean().item()}


# --------------------------------------------------------------------------- 2:4 kernels


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input columns (magnitude 2:4)."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(rows, cols)


def time_call(fn, device: torch.device, reps: int, per_graph: int) -> tuple[float, str]:
    """Seconds per call: replayed CUDA graph of ``per_graph`` calls, else eager, CUDA events."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    sync(device)
    method = "cuda-graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
        sync(device)
        run, calls = graph.replay, per_graph
    except Exception as error:
        method = f"eager ({type(error).__name__}: {str(error)[:80]})"
        sync(device)

        def run():
            for _ in range(per_graph):
                fn()

        calls = per_graph
        run()
        sync(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000 / calls)
    return statistics.median(times), method


def bench_semi_structured(device: torch.device, token_counts: list[int], reps: int, backend: str) -> dict:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend != "auto":
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    torch.manual_seed(0)
    rows: list[dict] = []
    kind = None
    for label, out_features, in_features in SPARSE_SHAPES:
        dense_w = prune_2_4(torch.randn(out_features, in_features, device=device, dtype=torch.float16) * 0.02)
        try:
            sparse_w = to_sparse_semi_structured(dense_w)
        except Exception as error:
            rows.append(
                {
                    "layer": label,
                    "out_features": out_features,
                    "in_features": in_features,
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            print(f"[2:4] {label}: {rows[-1]['error']}", flush=True)
            continue
        kind = type(sparse_w).__name__
        for tokens in token_counts:
            x = torch.randn(tokens, in_features, device=device, dtype=torch.float16)
            y_dense = F.linear(x, dense_w)
            y_sparse = F.linear(x, sparse_w)
            error = ((y_sparse.float() - y_dense.float()).abs().max() / y_dense.float().abs().max()).item()
            per_graph = max(1, min(200, int(2e10 // (2 * tokens * in_features * out_features) + 1)))
            t_dense, m_dense = time_call(lambda x=x, w=dense_w: F.linear(x, w), device, reps, per_graph)
            t_sparse, m_sparse = time_call(lambda x=x, w=sparse_w: F.linear(x, w), device, reps, per_graph)
            flops = 2 * tokens * in_features * out_features
            row = {
                "layer": label,
                "out_features": out_features,
                "in_features": in_features,
                "tokens": tokens,
                "dense_us": t_dense * 1e6,
                "sparse_us": t_sparse * 1e6,
                "speedup": t_dense / t_sparse,
                "dense_tflops": flops / t_dense / 1e12,
                "sparse_tflops_dense_equiv": flops / t_sparse / 1e12,
                "max_rel_error": error,
                "correct": error < 1e-2,
                "timing": m_dense if m_dense == m_sparse else f"dense {m_dense}; sparse {m_sparse}",
                "calls_per_graph": per_graph,
            }
            rows.append(row)
            print(f"[2:4] {json.dumps(row)}", flush=True)
        del dense_w, sparse_w
        torch.cuda.empty_cache()
    return {"backend": kind, "dtype": "float16", "rows": rows}


# --------------------------------------------------------------------------- driver


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(device: torch.device) -> dict:
    """The common environment record, plus the CPU, torch's threads and the format libraries."""
    info = common_environment(str(device))
    info.update(cpu=cpu_model(), torch_threads=torch.get_num_threads())
    for package in ("compressed_tensors", "bitsandbytes", "safetensors", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    return info


def mb(value: int) -> str:
    return f"{value / 1e6:.1f}"


def formats_table(results: list[dict], batches: list[int]) -> str:
    base = next((r for r in results if r["name"] == "bf16"), None)
    speed_cols = [f"tok/s b{b}" for b in batches]
    head = [
        "format",
        "stored as",
        "checkpoint MB",
        "vs bf16",
        "Linear MB",
        "Linear vs bf16",
        "load s",
        "load + 1st forward s",
    ]
    head += [*speed_cols, "KL to bf16 (nats/token)", "top-1 agree", "greedy = bf16"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        d = r["disk"]
        cells = [
            r["name"],
            ", ".join(f"{k} x{v}" for k, v in d["storage"].items()),
            mb(d["disk_bytes"]),
            f"{d['disk_bytes'] / base['disk']['disk_bytes']:.3f}" if base else "",
            mb(d["linear_disk_bytes"]),
            f"{d['linear_ratio']:.3f}",
            f"{statistics.median(r['load_seconds']):.2f}",
            f"{statistics.median(r['ready_seconds']):.2f}",
        ]
        for b in batches:
            g = r["generate"].get(str(b))
            ref = base["generate"].get(str(b)) if base else None
            cell = f"{g['tokens_per_s']:.1f}" if g else "-"
            if g and ref and r is not base:
                cell += f" ({g['tokens_per_s'] / ref['tokens_per_s']:.2f}x)"
            cells.append(cell)
        q = r.get("quality") or {}
        cells += [
            f"{q['kl_mean']:.4f}" if q else "0 (reference)",
            f"{q['top1_agreement']:.3f}" if q else "1",
            f"{r['greedy_match']}/{r['greedy_total']}" if "greedy_match" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sparse_table(sparse: dict) -> str:
    head = "| layer (out x in) | tokens | dense F.linear (us) | 2:4 sparse (us) | speedup | dense TFLOP/s | max rel. error | timing |"
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in sparse["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['layer']} ({r['out_features']}x{r['in_features']}) | - | - | - | - | - | - | {r['error'][:100]} |"
            )
            continue
        lines.append(
            f"| {r['layer']} ({r['out_features']}x{r['in_features']}) | {r['tokens']} | {r['dense_us']:.1f} "
            f"| {r['sparse_us']:.1f} | {r['speedup']:.2f}x | {r['dense_tflops']:.1f} | {r['max_rel_error']:.1e} "
            f"| {r['timing']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda, cuda:N or cpu")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ", ".join(FORMATS))
    parser.add_argument("--batches", default=None, help="generate batch sizes (default 1,16 on cuda, 1,4 on cpu)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 on cuda, 16 on cpu")
    parser.add_argument("--gen-reps", type=int, default=None, help="timed generate calls (default 3 on cuda, 2 on cpu)")
    parser.add_argument("--load-reps", type=int, default=3)
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared/data/wikitext-2/test.txt",
        help="WikiText-2 test text for the KL (default ../shared/data/wikitext-2/test.txt)",
    )
    parser.add_argument("--kl-samples", type=int, default=2)
    parser.add_argument("--kl-seq-len", type=int, default=256)
    parser.add_argument("--sparse-tokens", default="16,256,4096", help="token counts (rows of x) for the 2:4 part")
    parser.add_argument("--sparse-reps", type=int, default=20)
    parser.add_argument("--sparse-backend", choices=("auto", "cutlass", "cusparselt"), default="auto")
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep recipes and checkpoints here (default: a temp dir)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints already written in --workdir")
    parser.add_argument("--json", type=Path, default=None, help="results file (default $OUT/bench_formats.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        parser.error("CUDA is not available (use --device cpu)")
    on_gpu = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,16" if on_gpu else "1,4")).split(",")]
    new_tokens = args.new_tokens or (128 if on_gpu else 16)
    gen_reps = args.gen_reps or (3 if on_gpu else 2)
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    for name in names:
        if name not in FORMATS:
            parser.error(f"unknown format {name!r}")
    if "bf16" not in names:
        names.insert(0, "bf16")  # the baseline of every ratio and of the KL
    names.sort(key=lambda n: n != "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(json.dumps(env), flush=True)

    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="bench_formats_")
        workdir = Path(temp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        written = write_checkpoints(names, workdir, args.reuse)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(written["bf16"]["dir"])
        tokens = kl_tokens(tokenizer, args.data, args.kl_samples, args.kl_seq_len)
        results, reference, reference_greedy = [], None, None
        for name in names:
            directory = written[name]["dir"]
            result = {"name": name, "write_seconds": written[name]["seconds"], "recipe": written[name]["recipe"]}
            result["disk"] = disk_summary(directory)
            model, result["load_seconds"], result["ready_seconds"] = timed_loads(directory, device, args.load_reps)
            result["linear_classes"] = linear_classes(model)
            result["generate"] = {
                str(b): generate_speed(model, tokenizer, device, b, new_tokens, gen_reps) for b in batches
            }
            greedy = result["generate"][str(batches[0])]["tokens"]
            scores = log_probs(model, tokens, device)
            if name == "bf16":
                reference, reference_greedy = scores, greedy
            else:
                result["quality"] = quality(reference, scores)
                result["greedy_match"] = sum(a == b for a, b in zip(greedy, reference_greedy))
                result["greedy_total"] = len(greedy)
            print(f"[measure] {name}: " + json.dumps({k: v for k, v in result.items() if k != "recipe"}), flush=True)
            results.append(result)
            del model, scores
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    finally:
        if temp is not None:
            temp.cleanup()

    sparse: dict
    if args.skip_sparse:
        sparse = {"skipped": "--skip-sparse"}
    elif not on_gpu:
        sparse = {
            "skipped": "2:4 semi-structured kernels (torch.sparse.to_sparse_semi_structured: CUTLASS / "
            "cuSPARSELt) run on CUDA GPUs of compute capability 8.0+ only, not on the CPU"
        }
    else:
        token_counts = [int(t) for t in args.sparse_tokens.split(",")]
        sparse = bench_semi_structured(device, token_counts, args.sparse_reps, args.sparse_backend)

    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    print(
        f"\nSmolLM2-135M-Instruct, device {device} ({where}); generate: greedy, "
        f"{new_tokens} new tokens, median of {gen_reps}; load: median of {args.load_reps}; "
        f"KL on {args.kl_samples} x {args.kl_seq_len} WikiText-2 test tokens"
    )
    print(formats_table(results, batches))
    for r in results:
        print(f"{r['name']}: loaded Linear classes {r['linear_classes']}")
    w4 = next((r for r in results if r["name"] == "ct-w4a16-g64"), None)
    if w4:
        ratio = w4["disk"]["linear_ratio"]
        print(f"\ntarget W4A16 g64 Linear layers <= 0.3x bf16: {'met' if ratio <= 0.3 else 'NOT met'} ({ratio:.3f}x)")
    if "rows" in sparse:
        print(f"\n2:4 semi-structured vs dense F.linear, fp16, backend {sparse['backend']}")
        print(sparse_table(sparse))
        bad = [r for r in sparse["rows"] if not r.get("correct")]
        print("2:4 correctness: " + ("all outputs match dense" if not bad else f"{len(bad)} MISMATCHES OR ERRORS"))
    else:
        print(f"\n2:4 kernels skipped: {sparse['skipped']}")

    out = args.json or (Path(os.environ["OUT"]) / "bench_formats.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m scripts.bench_formats " + " ".join(argv if argv is not None else sys.argv[1:])
        payload = {
            "environment": env,
            "command": command.strip(),
            "settings": {
                "batches": batches,
                "new_tokens": new_tokens,
                "gen_reps": gen_reps,
                "load_reps": args.load_reps,
                "kl_samples": args.kl_samples,
                "kl_seq_len": args.kl_seq_len,
                "prompt": PROMPT,
                "data": str(args.data),
            },
            "formats": [{**r, "disk": r["disk"]} for r in results],
            "semi_structured_2_4": sparse,
        }
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    ok = all(r.get("correct", True) and "error" not in r for r in sparse.get("rows", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
