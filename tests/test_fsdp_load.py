"""Loading for FSDP on two CPU processes (torchrun, gloo), through scripts/bench_fsdp_load.py: the
model loaded lazily (each process reading its rows of each tensor from the memory-mapped shards)
costs each process's host the same beyond its own shards at 2 and at 8 layers, holds exactly the
shards the whole-loaded model is cut into, and keeps its head tied to the embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_fsdp_load import NARROW, build

ROOT = Path(__file__).resolve().parents[1]
LAYER_BYTES = 2 * (4 * NARROW["hidden_size"] ** 2 + 3 * NARROW["hidden_size"] * NARROW["intermediate_size"])
"""One narrow decoder layer in bf16 (the attention's four square projections at most, and the MLP's three)."""


def measure(directory: Path, path: str, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "scripts.bench_fsdp_load"]
    command += ["measure", str(directory), "--path", path, "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["processes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp-load")
    for layers in (2, 8):
        build(directory / f"layers{layers}", layers, smoke=True)
    return directory


def test_host_memory_beyond_the_shards_does_not_grow_with_the_layers(models):
    two = measure(models / "layers2", "lazy", models / "lazy2.json")
    eight = measure(models / "layers8", "lazy", models / "lazy8.json")
    for short, deep in zip(two, eight):
        assert deep["local_shard_bytes"] > 3 * short["local_shard_bytes"]  # the shards grew with the model
        assert deep["host_overhead_bytes"] - short["host_overhead_bytes"] < LAYER_BYTES / 2, (short, deep)
        assert short["tied"] and deep["tied"]


def test_each_process_reads_the_shards_the_whole_loaded_model_is_cut_into(models):
    lazy = measure(models / "layers2", "lazy", models / "lazy.json")
    whole = measure(models / "layers2", "eager", models / "eager.json")
    assert [p["checksum"] for p in lazy] == [p["checksum"] for p in whole]
    assert lazy[0]["checksum"] != lazy[1]["checksum"]  # each process holds its own rows
    assert all(p["tied"] for p in [*lazy, *whole])
