"""compress inspect: format, per-layer storage and bytes, on checkpoints compress wrote."""

from __future__ import annotations

from click.testing import CliRunner

from compress.checkpoint.inspect import inspect_checkpoint, storage_groups
from compress.cli import cli
from compress.engine import apply_recipe
from compress.validate import check_recipe

MLP = "re:.*mlp\\.(gate|up|down)_proj$"
ATTENTION = "re:.*self_attn\\.(q|k|v|o)_proj$"


def write(host, write_recipe, tmp_path, stages, **output):
    out = tmp_path / "out"
    apply_recipe(host, check_recipe(host, write_recipe(stages=stages, evaluate=[], output={"dir": str(out), **output})))
    return out


def test_mixed_precision_compressed_tensors(host, write_recipe, tmp_path, tiny_lm_dir):
    stages = [
        {"method": "rtn", "targets": [MLP], "bits": 4, "group_size": 64},
        {"method": "rtn", "targets": [ATTENTION], "bits": 8, "granularity": "channel", "symmetric": False},
    ]
    summary = inspect_checkpoint(write(host, write_recipe, tmp_path, stages, format="compressed-tensors"))
    assert summary.format == "compressed-tensors (pack-quantized)"
    groups = storage_groups(summary)
    assert sorted(groups) == ["int4 group 64 sym", "int8 channel asym"]
    assert len(groups["int4 group 64 sym"]) == 6 and len(groups["int8 channel asym"]) == 8
    four_bit = groups["int4 group 64 sym"]
    ratio = sum(layer.disk_bytes for layer in four_bit) / sum(layer.bf16_bytes for layer in four_bit)
    # 4-bit codes are 1/4 of bf16; one float32 scale per 64 weights adds 4/128
    assert abs(ratio - (0.25 + 4 / 128)) < 1e-3
    # tied lm_head stores nothing, so only the 14 projections are listed
    assert len(summary.layers) == 14


def test_dense_and_bitsandbytes(host, write_recipe, tmp_path):
    dense = inspect_checkpoint(write(host, write_recipe, tmp_path, [{"method": "rtn", "bits": 4, "group_size": 64}]))
    assert dense.format == "dense" and {layer.storage for layer in dense.layers} == {"dense"}
    assert dense.linear_ratio() == 2.0  # float32 weights, twice bf16
    nf4 = inspect_checkpoint(write(host, write_recipe, tmp_path / "b", [], format="bitsandbytes"))
    assert nf4.format == "bitsandbytes" and {layer.storage for layer in nf4.layers} == {"nf4"}
    assert 0.25 < nf4.linear_ratio() < 0.3


def test_inspect_command(host, write_recipe, tmp_path):
    out = write(
        host, write_recipe, tmp_path, [{"method": "rtn", "bits": 4, "group_size": 64}], format="compressed-tensors"
    )
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "int4 group 64 sym" in result.output and "Linear layers: 0.281 x bf16" in result.output
    missing = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no such checkpoint directory" in missing.stderr
