"""What the benchmark scripts share: the plugin host, the environment record, the random
Llama-3-8B-shaped model, a context built around an in-memory model, and a stage clock.

Imported as ``scripts.common`` by scripts run from the repository root as
``python -m scripts.NAME`` (with compress installed, or ``PYTHONPATH=.:plugins``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from compress import hookimpl

GIB = 2**30

LLAMA_3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
CHUNK = 2**24  # elements filled per task when randomizing weights


def llama_config(tiny: bool, layers: int | None):
    """LlamaConfig of Llama-3-8B's published shape (``tiny``: a small one), ``layers`` decoder layers."""
    from transformers import LlamaConfig

    shape = dict(TINY if tiny else LLAMA_3_8B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    rope_theta = shape.pop("rope_theta")
    # transformers 5 keeps rope_theta inside rope_parameters; older versions take it directly.
    try:
        config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    except TypeError:
        config = LlamaConfig(**shape, rope_theta=rope_theta)
    found = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    if found != rope_theta:
        raise RuntimeError(f"config has rope_theta {found}, expected {rope_theta}")
    return config


def random_model(config, seed: int, threads: int):
    """LlamaForCausalLM on the host in bf16 with N(0, 0.02) weights, built without default init."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)  # still on meta: free
    model.to_empty(device="cpu")
    model.eval().requires_grad_(False)

    # Normal samples on the CPU are single-threaded inside torch; fill independent chunks
    # from a thread pool (torch releases the GIL), each with its own seeded generator.
    tasks = []
    for index, (name, param) in enumerate(model.named_parameters()):
        flat = param.data.view(-1)
        if name.endswith("norm.weight"):
            flat.fill_(1.0)
            continue
        for start in range(0, flat.numel(), CHUNK):
            tasks.append((seed * 1_000_003 + index * 65_537 + start // CHUNK, flat[start : start + CHUNK]))

    def fill(task):
        chunk_seed, chunk = task
        chunk.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(chunk_seed))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fill, tasks))

    # Non-persistent buffers (rotary inv_freq) are garbage after to_empty: rebuild them.
    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=config)
    return model


def plugin_host(method: str, package: str | None = None):
    """A host with the installed plugins and the built-in plugin of ``method`` (its package,
    ``compress_<method>`` unless given, registered by hand where no distribution is
    installed, hence no entry points)."""
    import importlib

    from compress.host import PluginHost

    host = PluginHost()
    host.load_plugins()
    if method not in host.methods():
        package = package or f"compress_{method}"
        host.register(importlib.import_module(package), name=package.removeprefix("compress_"))
    return host


def benchmark_recipe(model_dir, stages: str, calib: dict | None, device: str) -> str:
    """A generated benchmark recipe: the model directory in float32, a text calibration set
    (``calib``: path, samples, seq_len) if given, ``stages`` (YAML list items), no output,
    sequential on ``device``."""
    data = ""
    if calib is not None:
        data = (
            f"data:\n  calibration: {{path: {calib['path']}, samples: {calib['samples']}, "
            f"seq_len: {calib['seq_len']}}}\n"
        )
    return (
        f"model: {{name: {model_dir}, dtype: float32}}\n{data}stages:\n{stages}"
        f"output: null\nrun: {{device: {device}, mode: sequential}}\n"
    )


def checked_recipe(path, text: str, threads: int, host=None):
    """Write the recipe ``text`` to ``path`` and check it (the plugins loaded into ``host``, or a
    new host): ``(host, checked recipe)``, ready for ``compress.engine.apply_recipe``."""
    from compress.host import PluginHost
    from compress.validate import check_recipe

    torch.set_num_threads(threads)
    if host is None:
        host = PluginHost()
        host.load_plugins()
    path.write_text(text)
    return host, check_recipe(host, path)


def evaluate_domains(model, evals: dict, reference: dict) -> dict:
    """``{domain}_ppl``, ``_kl``, ``_top1`` and ``_tokens`` of ``model`` on each domain's windows
    (``evals``) against the reference log-probabilities (``scripts.bench_ptq.evaluate_windows``)."""
    from scripts.bench_ptq import evaluate_windows

    result = {}
    for key, windows in evals.items():
        measured = evaluate_windows(model, windows, reference[key])
        result |= {f"{key}_ppl": measured["perplexity"], f"{key}_kl": measured["kl"], f"{key}_top1": measured["top1"]}
        result[f"{key}_tokens"] = measured["tokens"]
    return result


def build_context(host, model, config, mode: str, device: torch.device, stage: dict):
    """A Context and a checked recipe for one ``stage`` (a recipe's stage entry) on an in-memory
    Llama, targeting every Linear but lm_head; the recipe is built, not read from a file."""
    from compress.checkpoint import LoadedModel
    from compress.context import Context, Report, environment_info
    from compress.recipe import Recipe
    from compress.targets import match_modules
    from compress.validate import PlannedStage

    recipe = Recipe.model_validate(
        {
            "model": "random-llama-3-8b",
            "stages": [stage],
            "run": {"device": str(device), "mode": mode},
        }
    )
    method_class = host.methods()[recipe.stages[0].method]
    method = method_class(method_class.Params.model_validate(recipe.stages[0].params))
    targets, ignore = list(method.default_targets), list(method.default_ignore)  # Linear, minus lm_head
    selected, unmatched = match_modules(model, targets, ignore)
    assert not unmatched, unmatched
    for name, module in selected.items():
        method.check_layer(name, module)
    checked = SimpleNamespace(
        recipe=recipe, stages=[PlannedStage(method=method, targets=targets, ignore=ignore, target_names=list(selected))]
    )
    loaded = LoadedModel(model, None, config, "causal-lm", base_model="random-llama-3-8b")
    report = Report(
        model={
            "name": recipe.model.name,
            "base_model": loaded.base_model,
            "task": loaded.task,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "bfloat16",
        },
        environment=environment_info(device),
    )
    context = Context(host, recipe, loaded, None, device, report)
    assert context.sequential == (mode == "sequential")
    return context, checked


class StageClock:
    """A plugin that timestamps the stage's start and end and each block in between.

    Outside the stage, inside ``run_stages``, are the moves of the whole model (whole mode).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.end = 0.0
        self.marks: list[float] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @hookimpl
    def compress_stage_start(self) -> None:
        self.start = self.now()
        self.marks = [self.start]

    @hookimpl
    def compress_block_done(self) -> None:
        self.marks.append(time.perf_counter())

    @hookimpl
    def compress_stage_end(self) -> None:
        self.end = self.now()

    def blocks(self) -> dict:
        seconds = [b - a for a, b in zip(self.marks, self.marks[1:])]
        if not seconds:
            return {}
        return {
            "blocks": len(seconds),
            "mean_seconds": sum(seconds) / len(seconds),
            "min_seconds": min(seconds),
            "max_seconds": max(seconds),
            "first_seconds": seconds[0],
        }


def environment(device: str) -> dict:
    """Versions, the platform and, on CUDA, the GPU: what every benchmark's JSON records."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            info["nvidia_smi"] = subprocess.run(
                query, capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def gib(value: int) -> str:
    """Bytes as GiB with two decimals, for tables."""
    return f"{value / GIB:.2f}"


def markdown_table(columns: list[str], rows: list[list[object]]) -> str:
    """A markdown table: a header of ``columns`` and one line per row, cells as given."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(path: Path | None, default_name: str, script: str, argv: list[str] | None, payload: dict) -> None:
    """Write ``payload`` with the command that made it to ``path`` (default ``$OUT/default_name``;
    nothing when neither is given) and say where."""
    if path is None and os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / default_name
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m scripts.{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    path.write_text(json.dumps({"command": command.strip(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
