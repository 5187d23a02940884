"""The rtn plugin as a method: layer reports, candidates for search methods."""

from __future__ import annotations

import torch
from torch import nn

from compress.context import Context
from compress.quant import QuantScheme
from compress.search import CandidateRequest, collect_candidates
from compress_rtn.method import RoundToNearest, storage_bits


class FakeContext:
    """Only what collect_candidates and compress_layer read: the host and the layer states."""

    def __init__(self, host):
        self.host = host
        self.layers = {}

    update_layer = Context.update_layer


def real_layer(tiny_lm_dir) -> nn.Linear:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    return model.model.layers[1].mlp.down_proj


def test_candidates_trade_storage_for_error(host, tiny_lm_dir):
    layer = real_layer(tiny_lm_dir)
    original = layer.weight.data.clone()
    request = CandidateRequest(settings={"bits": [2, 3, 4, 8], "group_size": [64]}, methods=frozenset({"rtn"}))
    candidates = collect_candidates(FakeContext(host), "down_proj", layer, request)
    assert [c.setting["bits"] for c in candidates] == [2, 3, 4, 8]
    costs = [c.cost for c in candidates]
    errors = [c.error for c in candidates]
    assert costs == sorted(costs) and errors == sorted(errors, reverse=True)
    assert costs[2] == layer.weight.numel() * 4 + (layer.weight.numel() // 64) * 16
    assert torch.equal(layer.weight.data, original)  # offering a variant changes nothing

    state = candidates[1].apply(layer)
    assert state.quant.scheme.bits == 3
    assert torch.equal(state.quant.fake_quantize(layer.weight.data), layer.weight.data)
    achieved = (layer.weight.data - original).pow(2).sum() / original.pow(2).sum()
    assert achieved.item() == candidates[1].error


def test_candidates_skip_group_sizes_that_do_not_divide(host, tiny_lm_dir):
    layer = real_layer(tiny_lm_dir)  # input width 1536 = 12 x 128, not a multiple of 1000
    request = CandidateRequest(settings={"bits": [4], "group_size": [1000, 128, None]}, methods=frozenset({"rtn"}))
    candidates = collect_candidates(FakeContext(host), "x", layer, request)
    assert [c.setting["group_size"] for c in candidates] == [128, None]
    # None: one scale per output channel, as group_size: null means in every quantizer
    assert candidates[1].apply(layer).quant.scale.shape == (layer.weight.shape[0], 1)


def test_methods_filter(host, tiny_lm_dir):
    request = CandidateRequest(settings={"bits": [4]}, methods=frozenset({"gptq"}))
    assert collect_candidates(FakeContext(host), "x", real_layer(tiny_lm_dir), request) == []


def test_storage_bits_for_each_granularity():
    weight = torch.zeros(8, 256)
    assert storage_bits(weight, QuantScheme(bits=4, granularity="tensor")) == 8 * 256 * 4 + 16
    assert storage_bits(weight, QuantScheme(bits=4, granularity="channel", symmetric=False)) == 8 * 256 * 4 + 8 * 24
    assert storage_bits(weight, QuantScheme(bits=3, group_size=64)) == 8 * 256 * 3 + 8 * 4 * 16


def test_layer_report_error_is_relative_frobenius(host, tiny_lm_dir):
    layer = real_layer(tiny_lm_dir)
    original = layer.weight.data.clone()
    context = FakeContext(host)
    report = RoundToNearest(QuantScheme(bits=4, group_size=64)).compress_layer(context, "down", layer)
    expected = (layer.weight.data - original).norm() / original.norm()
    assert abs(report["relative_error"] - expected.item()) < 1e-6
    assert context.layers["down"].method == "rtn"
