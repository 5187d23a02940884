"""Multi-process runs refused up front: more processes than CUDA devices, FSDP for a training
stage that cannot train sharded."""

from __future__ import annotations

import pytest
import yaml

from compress.errors import UserError
from compress.validate import check_device, check_recipe


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_more_processes_than_devices_is_refused(two_gpus, monkeypatch, device):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError) as raised:
        check_device(device)
    assert raised.value.message == (
        "3 processes on this machine, but it has 2 CUDA device(s): start at most 2 "
        "(accelerate launch --num_processes 2, torchrun --nproc_per_node 2)"
    )


def test_as_many_processes_as_devices_pass(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    check_device("cuda")
    check_device("auto")


def test_cpu_processes_are_not_counted_against_gpus(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_device("cpu")


def test_fsdp_with_a_training_stage_is_refused(host, tiny_model_dir, tiny_text_file, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = {
        "model": str(tiny_model_dir),
        "data": {"train": {"path": str(tiny_text_file), "samples": 4, "seq_len": 16}},
        "stages": [
            {"method": "rtn", "bits": 4, "group_size": 32},
            {"method": "distill", "steps": 2, "batch_size": 2},
        ],
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(UserError) as raised:
        check_recipe(host, path)
    message = str(raised.value)
    assert "distill cannot train sharded through the grids or masks that stage 1 (rtn) leaves" in message
    assert "\n" not in message
