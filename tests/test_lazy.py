"""``run: mode: lazy``: weights read from the shards one block at a time, output streamed
shard by shard; the output equals the sequential engine's, tensor for tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from compress.checkpoint.output import check_output_place
from compress.checkpoint.stream import ShardSink
from compress.engine import apply_recipe
from compress.errors import UserError
from compress.pytest_plugin import build_tiny_model
from compress.validate import check_recipe

SHARD = "60KB"  # the tiny model's blocks are about 130 KB in float32: several shards each way


def write_model(directory: Path, layers: int, tied: bool) -> Path:
    """The byte-level tiny Llama with ``layers`` random blocks, saved in several shards."""
    from transformers import AutoConfig, LlamaForCausalLM

    build_tiny_model(directory)
    config = AutoConfig.from_pretrained(directory)
    config.num_hidden_layers = layers
    config.tie_word_embeddings = tied
    for file in directory.glob("model*.safetensors*"):
        file.unlink()
    torch.manual_seed(layers)
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size=SHARD)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, bool], Path]:
    return {
        (layers, tied): write_model(tmp_path_factory.mktemp(f"llama-{layers}-{tied}"), layers, tied)
        for layers, tied in [(2, False), (4, False), (2, True)]
    }


def run(
    host, tmp_path: Path, model: Path, text_file: Path, mode: str, name: str, output_format: str = "dense", **recipe
) -> tuple[Path, object]:
    data = {"path": str(text_file), "samples": 4, "seq_len": 32}
    raw = {
        "model": str(model),
        "data": {"calibration": data},
        "run": {"device": "cpu", "mode": mode},
        "output": {"dir": str(tmp_path / name), "max_shard_size": SHARD, "format": output_format},
        **recipe,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    context = apply_recipe(host, check_recipe(host, path))
    return tmp_path / name, context


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                found[key] = handle.get_tensor(key)
    return found


def assert_same_checkpoint(lazy: Path, sequential: Path) -> None:
    ours, theirs = tensors(lazy), tensors(sequential)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    config = json.loads((lazy / "config.json").read_text())
    assert config == json.loads((sequential / "config.json").read_text())


STAGES = {
    "rtn-dense": ([{"method": "rtn", "bits": 4, "group_size": 32}], "dense"),
    "rtn-head-dense": (
        [{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["Linear"], "ignore": []}],
        "dense",
    ),
    "rtn-gptq-ct": (
        [
            {"method": "rtn", "bits": 8, "group_size": 32, "targets": ["re:.*mlp\\..*_proj$"]},
            {"method": "gptq", "bits": 4, "group_size": 32, "targets": ["re:.*self_attn\\..*_proj$"]},
        ],
        "compressed-tensors",
    ),
    "gptq-head-ct": (
        [{"method": "gptq", "bits": 4, "group_size": 32, "targets": ["Linear"], "ignore": []}],
        "compressed-tensors",
    ),
}


@pytest.mark.parametrize(
    ("plan", "tied"), [("rtn-dense", False), ("rtn-head-dense", True), ("rtn-gptq-ct", True), ("gptq-head-ct", False)]
)
def test_lazy_output_equals_sequential(host, models, tiny_text_file, tmp_path, plan, tied):
    stages, output_format = STAGES[plan]
    model = models[(2, tied)]
    outputs = {}
    for mode in ("sequential", "lazy"):
        outputs[mode], _ = run(host, tmp_path, model, tiny_text_file, mode, mode, output_format, stages=stages)
    assert_same_checkpoint(outputs["lazy"], outputs["sequential"])
    assert len(list(outputs["lazy"].glob("*.safetensors"))) > 1
    index = json.loads((outputs["lazy"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(outputs["lazy"]))


def test_materialized_weights_do_not_grow_with_depth(host, models, tiny_text_file, tmp_path):
    """Peak tensors held at once: the outside modules plus one block, for 2 layers as for 6."""
    stages = [{"method": "gptq", "bits": 4, "group_size": 32}]
    peaks = {}
    for layers in (2, 4):
        _, context = run(host, tmp_path, models[(layers, False)], tiny_text_file, "lazy", f"l{layers}", stages=stages)
        peaks[layers] = context.report.phases["stages"]["peak_materialized_bytes"]
        pending = context.report.phases["write"]["peak_pending_bytes"]
        model = context.model
        block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        outside = sum(p.numel() * p.element_size() for p in model.parameters()) - layers * block
        assert peaks[layers] == outside + block
        assert pending <= 60_000 + block
        assert all(p.is_meta for p in model.parameters())  # everything was released
    assert peaks[2] == peaks[4]


def test_shard_sink_layout(tmp_path):
    sink = ShardSink(tmp_path, max_shard_bytes=100)
    sink.add({"a": torch.zeros(20), "b": torch.ones(20)})  # 80 bytes each: one shard each
    sink.add({"c": torch.arange(3, dtype=torch.int8)})  # 3 bytes: joins b
    files = sink.finish()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": files[0].name,
        "b": files[1].name,
        "c": files[1].name,
    }
    assert index["metadata"]["total_size"] == 80 + 80 + 3
    assert sink.peak_pending_bytes == 83


def check_lazy(host, tmp_path: Path, model: Path, text_file: Path, **recipe) -> UserError:
    data = {"path": str(text_file), "samples": 4, "seq_len": 32}
    raw = {
        "model": str(model),
        "data": {"calibration": data, "evaluation": data},
        "run": {"device": "cpu", "mode": "lazy"},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "output": {"dir": str(tmp_path / "out")},
        **recipe,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    with pytest.raises(UserError) as raised:
        check_recipe(host, path)
    assert "\n" not in str(raised.value)
    return raised.value


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"evaluate": ["perplexity"]}, "cannot evaluate"),
        ({"output": None}, "it needs output:"),
        (
            {
                "stages": [
                    {"method": "gptq", "bits": 4, "group_size": 32},
                    {"method": "rtn", "bits": 8, "group_size": 32},
                ]
            },
            "no stage may follow the calibration stage 1",
        ),
        ({"stages": [{"method": "magnitude", "pattern": "2:4"}]}, "not what magnitude leaves"),
        (
            {
                "stages": [
                    {"method": "rtn", "bits": 8, "group_size": 32},
                    {"method": "gptq", "bits": 4, "group_size": 32},
                ]
            },
            "cannot follow them on the same layers (model.layers.0.self_attn.q_proj)",
        ),
    ],
)
def test_lazy_refusals(host, models, tiny_text_file, tmp_path, recipe, message):
    assert message in check_lazy(host, tmp_path, models[(2, False)], tiny_text_file, **recipe).message


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_shard_is_named(host, models, tiny_text_file, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(models[(2, False)], model)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    error = check_lazy(host, tmp_path, model, tiny_text_file)
    assert shard.name in f"{error.where} {error.message}"


class FakeUsage:
    def __init__(self, free: int) -> None:
        self.total, self.used, self.free = free, 0, free


@pytest.mark.parametrize(("free", "refused"), [(10**9, False), (10**9 - 1, True)])
def test_disk_space_boundary(monkeypatch, tmp_path, free, refused):
    """An output of exactly the free space fits; one byte more is refused in one line with both figures."""
    monkeypatch.setattr("compress.checkpoint.output.shutil.disk_usage", lambda _place: FakeUsage(free))
    if not refused:
        check_output_place(tmp_path / "out", 10**9)
        return
    with pytest.raises(UserError) as raised:
        check_output_place(tmp_path / "out", 10**9)
    assert raised.value.message == (
        f"not enough free space: the output needs about 1.0 GB (1,000,000,000 bytes), "
        f"{tmp_path} has 1.0 GB (999,999,999 bytes)"
    )


@pytest.mark.parametrize(
    ("stages", "reason"),
    [
        ([{"method": "gptq", "bits": 4, "group_size": 32, "target": "original"}], "(target: original)"),
        (
            [
                {"method": "kl_ptq", "bits": 4, "group_size": 32, "outlier_fraction": 0},
                {"method": "gptq", "bits": 4, "group_size": 32, "grid": "inherit"},
            ],
            "(grid: inherit, whose default is target: original)",
        ),
    ],
)
def test_original_model_is_refused_at_check(host, models, tiny_text_file, tmp_path, stages, reason):
    """gptq reading the original weights would load the whole original model: refused at check
    (the method says so through ``reads_original_model``), before anything is read or written."""
    error = check_lazy(host, tmp_path, models[(2, False)], tiny_text_file, stages=stages, evaluate=[])
    assert error.message == (
        f"run: mode: lazy never loads the whole model, so gptq cannot read the original one {reason}; "
        "use mode: sequential"
    )
    assert not (tmp_path / "out").exists()
