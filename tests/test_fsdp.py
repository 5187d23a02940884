"""FSDP training stages on two CPU processes (torchrun, gloo): the model loaded lazily (each
process reading its rows from the memory-mapped shards) trains and writes exactly what the
whole-loaded one does, and the one-process loss curve and weights; the model gathered block by
block into a checkpoint transformers loads, and ``--resume`` from sharded checkpoints only with
the process count that wrote them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from compress import hookimpl
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.pytest_plugin import build_tiny_model
from compress.validate import check_recipe
from compress_distill.method import Distill
from tests.conftest import WIKITEXT_VALID

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
SCRIPT = """
import os
import sys
import compress.training.sharding
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.host import PluginHost
from compress.validate import check_recipe
from tests.test_fsdp import StoppingPlugin
host = PluginHost()
host.load_plugins()
host.register(StoppingPlugin, name="stopping-distill")
if os.environ.get("LOAD_WHOLE"):  # every process loads the whole model, then shards it
    compress.training.sharding.loads_lazily = lambda host, recipe, loader: False
try:
    apply_recipe(host, check_recipe(host, sys.argv[1]), resume=sys.argv[2:] == ["--resume"])
except UserError as error:
    print(f"error: {error.where}: {error.message}", file=sys.stderr)
    sys.exit(2)
"""


class StoppingDistill(Distill):
    """distill whose loss is scaled by a trained gain outside the model (so the runs cover a
    method's own parameters: whole on every process, averaged, clipped and checkpointed with
    the shards), and that fails at the ``STOP_AT``-th loss of every process, as a crash would,
    leaving its last checkpoint (test only)."""

    name = "distill_stopping"

    def prepare(self, context, run, device):
        super().prepare(context, run, device)
        self.calls = 0
        self.gain = nn.Parameter(torch.ones((), device=device))

    def extra_parameters(self):
        return [*super().extra_parameters(), self.gain]

    def loss(self, model, batches):
        self.calls += 1
        if self.calls == int(os.environ.get("STOP_AT", "0")):
            raise RuntimeError("stopped by the test")
        value, logs = super().loss(model, batches)
        return value * self.gain, logs


class StoppingPlugin:
    @staticmethod
    @hookimpl
    def compress_register_methods(register):
        register(StoppingDistill)


def write_recipe(directory: Path, model: Path, name: str) -> Path:
    """Distillation of the MLPs from ``model``'s teacher (:func:`build_teacher`; with a trained gain,
    :class:`StoppingDistill`), with gradient checkpointing and a clipping norm small enough to
    act at every step. (Under FSDP no stage may come before it: the weights stay in their
    shards until it shards them.)"""
    recipe = {
        "model": str(model),
        "data": {"train": {"path": str(WIKITEXT_VALID), "samples": 16, "seq_len": 32}},
        "stages": [
            {
                "method": "distill_stopping",
                "targets": [r"re:.*mlp\..*_proj$"],
                "teacher": str(model.parent / "teacher"),
                "steps": 4,
                "batch_size": 4,
                "lr": 1e-3,
                "log_every": 1,
                "max_grad_norm": 1e-3,
                "gradient_checkpointing": True,
                "checkpoint_every": 2,
            },
        ],
        "run": {"device": "cpu"},
        "output": {"dir": str(directory / f"out-{name}")},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def build_teacher(model: Path) -> None:
    """A teacher beside ``model``: the model with its MLP weights perturbed (seeded), saved with
    its head still tied, so the student starts away from it."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.05)
    teacher.save_pretrained(model.parent / "teacher")


def launch(directory: Path, recipe: Path, processes: int, fsdp: bool, *args: str, stop_at: int = 0, whole=False):
    script = directory / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STOP_AT": str(stop_at)}
    env.pop("ACCELERATE_USE_FSDP", None)
    env.pop("LOAD_WHOLE", None)
    if whole:
        env["LOAD_WHOLE"] = "1"
    if fsdp:
        env["ACCELERATE_USE_FSDP"] = "true"
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    return subprocess.run([*launcher, str(script), str(recipe), *args], capture_output=True, text=True, env=env)


def details(directory: Path, name: str) -> dict:
    return json.loads((directory / f"out-{name}" / "report.json").read_text())["stages"][0]["details"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recipe run whole in one process, and sharded over two (FSDP), from the model loaded
    lazily (``fsdp``, what the engine does) and whole (``whole``)."""
    directory = tmp_path_factory.mktemp("fsdp")
    model = build_tiny_model(directory / "model")
    build_teacher(model)
    for name, processes, fsdp in (("one", 1, False), ("whole", 2, True), ("fsdp", 2, True)):
        done = launch(directory, write_recipe(directory, model, name), processes, fsdp, whole=name == "whole")
        assert done.returncode == 0, done.stderr[-3000:]
    return directory, model


def test_the_lazily_loaded_model_trains_and_writes_exactly_what_the_whole_loaded_one_does(runs):
    directory, _ = runs
    lazy, whole = details(directory, "fsdp"), details(directory, "whole")
    assert lazy["loss_curve"] == whole["loss_curve"]
    written = load_file(directory / "out-fsdp" / "model.safetensors")
    expected = load_file(directory / "out-whole" / "model.safetensors")
    assert sorted(written) == sorted(expected) and "lm_head.weight" not in written  # the head stays tied
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=0, rtol=0, msg=key)


def test_two_fsdp_processes_train_and_write_the_one_process_model(runs):
    from transformers import AutoModelForCausalLM

    directory, _ = runs
    one, fsdp = details(directory, "one"), details(directory, "fsdp")
    assert (one["devices"], one["fsdp"], fsdp["devices"], fsdp["fsdp"]) == (1, False, 2, True)
    assert [loss for _, loss in fsdp["loss_curve"]] == pytest.approx([loss for _, loss in one["loss_curve"]], rel=1e-4)
    assert one["loss_curve"][-1][1] < one["loss_curve"][0][1]
    whole = load_file(directory / "out-one" / "model.safetensors")
    gathered = load_file(directory / "out-fsdp" / "model.safetensors")
    assert sorted(gathered) == sorted(whole)
    for key, tensor in whole.items():
        assert gathered[key].dtype == tensor.dtype, key
        torch.testing.assert_close(gathered[key], tensor, atol=2e-6, rtol=0, msg=key)
    loaded = AutoModelForCausalLM.from_pretrained(directory / "out-fsdp")
    for key, tensor in loaded.state_dict().items():
        if key in gathered:
            torch.testing.assert_close(tensor, gathered[key], atol=0, rtol=0)
    assert loaded.config.architectures == ["LlamaForCausalLM"]


def test_sharded_checkpoint_resumes_to_the_uninterrupted_run_with_the_same_processes(runs, host, monkeypatch):
    directory, model = runs
    recipe = write_recipe(directory, model, "stopped")
    stopped = launch(directory, recipe, 2, True, stop_at=3)
    assert stopped.returncode != 0 and "stopped by the test" in stopped.stderr
    checkpoint = directory / "out-stopped.checkpoints" / "1-distill_stopping"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["processes"], state["sharded"]) == (2, 2, True)
    assert (checkpoint / "sharded").is_dir()

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # one process, in this one
    host.register(StoppingPlugin, name="stopping-distill")
    with pytest.raises(UserError) as refused:
        apply_recipe(host, check_recipe(host, recipe), resume=True)
    assert "cannot resume: the checkpoint was written sharded over 2 processes (FSDP)" in refused.value.message
    assert "\n" not in refused.value.message and not (directory / "out-stopped").exists()

    resumed = launch(directory, recipe, 2, True, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert details(directory, "stopped")["resumed_from_step"] == 2
    curve = details(directory, "stopped")["loss_curve"]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in details(directory, "fsdp")["loss_curve"]])
    continued = load_file(directory / "out-stopped" / "model.safetensors")
    for key, tensor in load_file(directory / "out-fsdp" / "model.safetensors").items():
        torch.testing.assert_close(continued[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_bench_script_runs_end_to_end_on_two_cpu_processes(tmp_path):
    """scripts/bench_fsdp.py --smoke: a tiny Llama built on the meta device, sharded, filled shard
    by shard, fine-tuned through the loop and written gathered, with its JSON of results."""
    results = tmp_path / "fsdp.json"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [*TORCHRUN, "-m", "scripts.bench_fsdp", "--smoke", "--json", str(results), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(results.read_text())
    assert report["processes"] == 2 and report["steps"] == 3 and report["tokens_per_second"] > 0
    assert 0 <= report["output_bytes"] - 2 * report["parameters"] < 2**16  # bf16, each tensor once, plus headers
    assert report["full_state_bytes_16_per_parameter"] == 16 * report["parameters"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert model.dtype == torch.bfloat16
