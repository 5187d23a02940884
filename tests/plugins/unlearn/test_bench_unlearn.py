"""scripts.bench_unlearn's W4 rows on the tiny Llama: the reference it quantizes and the rows it
compares with it."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from scripts.bench_unlearn import bench_quantized, parse_arguments
from scripts.finetune_unlearn_target import finetune_all, unlearn_host
from scripts.make_unlearn_data import generate


def distinct_per_group(weight: torch.Tensor, group_size: int) -> int:
    """The most distinct values in any ``group_size`` run of a row of ``weight``."""
    groups = weight.reshape(-1, group_size)
    return max(len(torch.unique(group)) for group in groups)


def test_w4_rows_compare_with_the_retain_model_quantized_alike(tiny_model_dir, tmp_path):
    command = f"--out {tmp_path} --model {tiny_model_dir} --authors 10 --splits 10 --epochs 1 --unlearn-epochs 1"
    settings = "--unlearn-lrs 1e-3 --quant-lrs 1e-3,1e-2 --max-new-tokens 4 --eval-retain 4 --eval-batch 8"
    args = parse_arguments([*command.split(), *settings.split(), "--device", "cpu"])
    generate(args.data, args.authors, 10, args.seed)
    finetune_all(args, args.data, args.models)

    result, saves = {}, []
    bench_quantized(args, unlearn_host(), result, lambda: saves.append(len(result["runs"])))

    assert saves == [0, 1, 2], "saved after the reference rows and after each learning rate"

    assert set(result["runs"]) == {"0.001", "0.01"}
    assert result["retain_w4"]["forget_quality_w4"] == 1.0
    for run in result["runs"].values():
        assert 0.0 <= run["after_w4"]["forget_quality_w4"] <= 1.0
        assert "forget_quality_w4" not in run["before"]
    original = load_file(args.models / "retain90" / "model.safetensors")
    quantized = load_file(args.out / "retain90-w4" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert distinct_per_group(quantized[name], 64) <= 16 < distinct_per_group(original[name], 64)
