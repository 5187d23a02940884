"""Output safety beyond the fault corpus: the final rename, the locks, stale debris, file
modes, the output-size estimate, and concurrent first conversions of a built-in model.

The corpus (tests/faults/cases_environment.py, cases_concurrency.py, cases_signals.py)
runs the CLI against each fault; these tests pin down the pieces it is built from.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compress.checkpoint.atomic import atomic_directory, remove_stale
from compress.errors import UserError
from compress.locks import LockBusy, lock_path, locked

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: no process has it


def test_final_rename_refuses_a_target_that_appeared_during_the_run(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with (
        pytest.raises(UserError, match="appeared during the run") as raised,
        atomic_directory(target, overwrite=False) as staging,
    ):
        (staging / "weights.txt").write_text("mine")
        target.mkdir()
        (target / "weights.txt").write_text("theirs")
    assert raised.value.where == str(target)
    assert (target / "weights.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", overwrite=False) as staging:
            save_file({"w": torch.zeros(2)}, staging / "model.safetensors")  # safetensors creates it 0600
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


def test_stale_debris_is_removed_and_a_retired_output_put_back(tmp_path: Path, capsys) -> None:
    target = tmp_path / "out"
    partial = tmp_path / f".out.partial-{DEAD_PID}-abc"
    retired = tmp_path / f".out.old-{DEAD_PID}-def"
    alive = tmp_path / f".out.partial-{os.getpid()}-ghi"
    other = tmp_path / f".other.partial-{DEAD_PID}-jkl"
    for directory in (partial, retired / "out", alive, other):
        directory.mkdir(parents=True)
    (retired / "out" / "config.json").write_text("{}")
    remove_stale(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "out"])
    assert (target / "config.json").read_text() == "{}"
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and all(f"pid {DEAD_PID}" in note for note in notes)


def test_a_held_lock_refuses_naming_its_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with locked(target, wait=False):
        assert lock_path(target).read_text().strip() == str(os.getpid())
        with pytest.raises(LockBusy) as raised, locked(target, wait=False):
            pass
        assert raised.value.holder == os.getpid()
    assert not lock_path(target).exists()
    with locked(target, wait=False):  # free again
        pass


def test_check_recipe_refuses_a_cuda_device_the_machine_lacks(host, write_recipe) -> None:
    import torch

    from compress.validate import check_recipe

    device = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(UserError, match=f"device '{device}' is not available") as raised:
        check_recipe(host, write_recipe(run={"device": device}))
    assert "recipe.yaml" in str(raised.value.where)


def test_dense_estimate_matches_the_written_weights(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    from compress.checkpoint.loaders import meta_model
    from compress.checkpoint.output import DenseWriter, estimated_output_bytes

    skeleton = meta_model(AutoConfig.from_pretrained(tiny_model_dir), "causal-lm")
    dense = estimated_output_bytes(skeleton, {}, DenseWriter(), 4)
    written = (tiny_model_dir / "model.safetensors").stat().st_size
    assert 0.95 * written <= dense <= written
    linear = {name: 4 for name, module in skeleton.named_modules() if name.endswith("_proj")}
    packed = type("Packed", (), {"requantizes": False})()
    assert estimated_output_bytes(skeleton, linear, packed, 4) < dense
    assert estimated_output_bytes(skeleton, linear, DenseWriter(), 4) == dense


CONVERT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from compress.checkpoint import builtin
    from compress.checkpoint.loaders import DirectoryLoader
    from compress.recipe import ModelSpec

    tiny, log, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    (ready / str(os.getpid())).touch()

    class SlowConversion:
        def load(self, spec):
            with log.open("a") as handle:
                handle.write(f"{os.getpid()}\\n")
            while len(list(ready.iterdir())) < 3:  # every process has reached the cache
                time.sleep(0.05)
            time.sleep(1.0)
            return DirectoryLoader().load(ModelSpec(name=tiny))

    builtin.package_file = lambda model: Path(tiny) / "model.gguf"
    builtin.GGUFLoader = SlowConversion
    print(builtin.BuiltinLoader().directory("smollm2-135m-instruct"))
    """
)


def test_concurrent_first_uses_convert_once_and_share_the_result(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Three processes on an empty cache, the conversion stubbed by a slow copy of the tiny model."""
    cache, log, ready = tmp_path / "cache", tmp_path / "conversions.log", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "COMPRESS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", CONVERT, str(tiny_model_dir), str(log), str(ready)]
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [stderr for _, stderr in results]
    converted = cache / "models" / "smollm2-135m-instruct"
    assert {stdout.strip() for stdout, _ in results} == {str(converted)}
    assert len(log.read_text().split()) == 1
    assert sum("waiting for pid" in stderr for _, stderr in results) == 2
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["smollm2-135m-instruct"]
    assert (converted / "config.json").is_file()
