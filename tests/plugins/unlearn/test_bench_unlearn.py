"""scripts.bench_unlearn on the tiny Llama: the table's rows, and the W4 rows with the reference
they quantize."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from scripts.bench_unlearn import bench_quantized, bench_split, parse_arguments
from scripts.finetune_unlearn_target import finetune_all, unlearn_host
from scripts.make_unlearn_data import generate


@pytest.fixture(scope="module")
def bench_args(tiny_model_dir, tmp_path_factory) -> argparse.Namespace:
    """The benchmark's settings, shrunk, with its data generated and its target and retain90 fine-tuned."""
    out = tmp_path_factory.mktemp("unlearn-bench")
    command = f"--out {out} --model {tiny_model_dir} --authors 10 --splits 10 --epochs 1 --unlearn-epochs 1"
    settings = "--methods ga,npo --unlearn-lrs 1e-3,1e-2 --quant-lrs 1e-3,1e-2 --max-new-tokens 4 --eval-retain 4"
    args = parse_arguments([*command.split(), *settings.split(), "--eval-batch", "8", "--device", "cpu"])
    generate(args.data, args.authors, 10, args.seed)
    finetune_all(args, args.data, args.models)
    return args


def distinct_per_group(weight: torch.Tensor, group_size: int) -> int:
    """The most distinct values in any ``group_size`` run of a row of ``weight``."""
    groups = weight.reshape(-1, group_size)
    return max(len(torch.unique(group)) for group in groups)


def test_the_table_has_both_references_and_each_method_at_each_lr(bench_args):
    rows, saves = {}, []
    bench_split(bench_args, unlearn_host(), 10, rows, lambda: saves.append(len(rows)))

    assert list(rows) == ["target", "retain", "ga@0.001", "ga@0.01", "npo@0.001", "npo@0.01"]
    assert saves == [2, 3, 4, 5, 6], "saved after the references and after each row"
    assert rows["retain"]["forget_quality"] == 1.0
    assert "seconds" not in rows["target"]
    for name in list(rows)[2:]:
        assert rows[name]["seconds"] > 0 and rows[name]["lr"] == float(name.split("@")[1])
        assert 0.0 <= rows[name]["forget_quality"] <= 1.0


def test_w4_rows_compare_with_the_retain_model_quantized_alike(bench_args):
    result, saves = {}, []
    bench_quantized(bench_args, unlearn_host(), result, lambda: saves.append(len(result["runs"])))

    assert saves == [0, 1, 2], "saved after the reference rows and after each learning rate"
    assert set(result["runs"]) == {"0.001", "0.01"}
    assert result["retain_w4"]["forget_quality_w4"] == 1.0
    for run in result["runs"].values():
        assert 0.0 <= run["after_w4"]["forget_quality_w4"] <= 1.0
        assert "forget_quality_w4" not in run["before"]
    original = load_file(bench_args.models / "retain90" / "model.safetensors")
    quantized = load_file(bench_args.out / "retain90-w4" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert distinct_per_group(quantized[name], 64) <= 16 < distinct_per_group(original[name], 64)
