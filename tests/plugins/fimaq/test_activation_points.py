"""The host's activation points (compress.activation_points) and the gradient pass after a block
(compress.gradients.gradients_after_block) that FIMA-Q's Fisher refresh uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.activation_points import (
    ActivationPoint,
    PointQuantization,
    PointScheme,
    points_files,
    quantized_points,
    read_points,
    site_modules,
)
from compress.blocks import find_blocks, stack_inputs
from compress.errors import UserError
from compress.gradients import block_output_gradients, gradients_after_block
from tests.models import tiny_vit_config


class Spy(nn.Module):
    """An identity point that counts its calls and keeps the last shape."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.shape = 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shape = tuple(x.shape)
        return x


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_vit():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config(image_size=32, num_labels=3)).eval()


def spies_everywhere(model: nn.Module) -> dict[str, Spy]:
    return {
        f"{name}:{site}": Spy() for site in ("query", "key", "value", "probs") for name in site_modules(model, site)
    }


@pytest.mark.parametrize("build", [tiny_vit, tiny_llama], ids=["vit", "llama-gqa-causal"])
def test_the_points_attention_matches_the_models_own_when_nothing_is_quantized(build):
    model = build()
    inputs = (
        {"pixel_values": torch.randn(2, 3, 32, 32)}
        if hasattr(model, "vit")
        else {"input_ids": torch.randint(0, 64, (2, 9))}
    )
    before = model.config._attn_implementation
    with torch.no_grad():
        expected = model(**inputs).logits
        spies = spies_everywhere(model)
        with quantized_points(model, spies):
            assert model.config._attn_implementation == "compress_points"
            got = model(**inputs).logits
    assert model.config._attn_implementation == before
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(spy.calls == 1 for spy in spies.values())
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", heads)
    name = next(name for name in spies if name.endswith(":key"))
    assert spies[name].shape[1] == kv_heads  # keys are quantized before their heads are repeated
    probs = next(spy for name, spy in spies.items() if name.endswith(":probs"))
    assert probs.shape[1] == heads and probs.shape[-1] == probs.shape[-2]


def test_a_quantized_point_changes_the_output_and_stops_when_closed():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32)
    name = next(iter(site_modules(model, "probs")))
    point = ActivationPoint(PointScheme(bits=2), torch.tensor([1 / 3]))
    with torch.no_grad():
        plain = model(pixel_values=pixels).logits
        with quantized_points(model, {f"{name}:probs": point}):
            quantized = model(pixel_values=pixels).logits
        after = model(pixel_values=pixels).logits
    assert not torch.allclose(quantized, plain)
    torch.testing.assert_close(after, plain)


def test_nested_point_sets_close_independently():
    model = tiny_vit()
    attention = list(site_modules(model, "query"))
    outer, inner = PointQuantization(model), PointQuantization(model)
    first, second = Spy(), Spy()
    outer.add({f"{attention[0]}:query": first})
    inner.add({f"{attention[1]}:query": second, f"{attention[0]}:probs": Spy()})
    inner.close()
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert (first.calls, second.calls) == (1, 0)
    assert model.config._attn_implementation == "compress_points"
    outer.close()
    assert model.config._attn_implementation != "compress_points"


def test_uniform_grid_is_asymmetric_with_a_rounded_zero_point():
    point = ActivationPoint(PointScheme(bits=2), torch.tensor([0.5]), torch.tensor([1.0]))
    x = torch.tensor([-2.0, -0.5, -0.2, 0.3, 0.8, 5.0])
    # codes 0..3, zero point 1: values -0.5, 0, 0.5, 1.0
    assert point(x).tolist() == [-0.5, -0.5, 0.0, 0.5, 1.0, 1.0]


def test_log2_grid_takes_powers_of_two_and_zeroes_what_falls_below():
    point = ActivationPoint(PointScheme(bits=2, grid="log2"), torch.tensor([1.0]))
    x = torch.tensor([1.0, 0.6, 0.3, 0.13, 0.01])
    # codes -log2: 0, 1, 2, 3 (levels 0..3), 0.01 -> code 7 > 3: zero
    assert point(x).tolist() == [1.0, 0.5, 0.25, 0.125, 0.0]


def test_rounding_passes_gradients_to_the_step_size():
    point = ActivationPoint(PointScheme(bits=4), torch.tensor([0.1]))
    point.scale.requires_grad_(True)
    point(torch.tensor([0.26, 2.0])).sum().backward()
    # LSQ's step-size gradient: round(x/s) - x/s inside the range (0.4), the clamped code outside (15)
    torch.testing.assert_close(point.scale.grad, torch.tensor([15.4]))


def test_per_token_scales_refuse_another_length():
    point = ActivationPoint(PointScheme(bits=4, granularity="token"), torch.ones(1, 5, 1))
    point(torch.randn(2, 5, 8))
    with pytest.raises(UserError, match="calibrated for 5 tokens; this input has 7"):
        point(torch.randn(2, 7, 8))


def test_unknown_sites_and_modules_are_named():
    model = tiny_vit()
    with pytest.raises(UserError, match="'scores' is not an activation point"):
        PointQuantization(model).add({"vit.layers.0.attention:scores": Spy()})
    with pytest.raises(UserError, match="no such module"):
        PointQuantization(model).add({"vit.layers.9.attention:query": Spy()})
    with pytest.raises(UserError, match="not an attention module"):
        PointQuantization(model).add({"vit.layers.0.mlp.fc1:query": Spy()})


def test_point_files_round_trip():
    points = {
        "a.fc:input": ActivationPoint(PointScheme(bits=3, granularity="channel"), torch.rand(6), torch.arange(6.0)),
        "a.attention:probs": ActivationPoint(
            PointScheme(bits=4, grid="log2", granularity="head"), torch.rand(1, 2, 1, 1)
        ),
    }
    import json

    from safetensors.torch import load

    files = points_files(points)
    listing = json.loads(files["activation_points.json"])
    assert listing["points"]["a.attention:probs"] == {
        "bits": 4,
        "grid": "log2",
        "granularity": "head",
        "scale_shape": [1, 2, 1, 1],
    }
    back = read_points(listing, load(files["activation_points.safetensors"]))
    for name, point in points.items():
        assert back[name].scheme == point.scheme
        assert torch.equal(back[name].scale, point.scale) and torch.equal(back[name].zero_point, point.zero_point)


def test_gradients_after_a_block_equal_the_whole_model_backward():
    """Given each sample's real output of block 0, the gradients at that output equal the
    block-by-block backward of block_output_gradients."""
    from compress.blocks import block_outputs
    from compress.data import collate

    model = tiny_vit()
    samples = [{"pixel_values": torch.randn(3, 32, 32), "labels": torch.tensor(i % 3)} for i in range(5)]

    def loss_one(output, batch, _position):
        return nn.functional.cross_entropy(output.logits, batch["labels"], reduction="sum")

    expected = block_output_gradients(model, samples, loss_one, torch.device("cpu"))[0]
    outputs, returns_tuple = block_outputs(model, samples, torch.device("cpu"), every=True)
    block0 = [args[0] if args else kwargs["hidden_states"] for args, kwargs in outputs[0]]
    got = gradients_after_block(
        model,
        0,
        block0,
        samples,
        lambda output, batch, _chunk: nn.functional.cross_entropy(output.logits, batch["labels"], reduction="sum"),
        torch.device("cpu"),
        returns_tuple,
        batch_size=2,
    )
    assert len(got) == 5
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)
    assert collate  # the batches above are collated by the facility itself


def test_stacking_block_inputs_needs_the_other_arguments_equal():
    mask = torch.ones(1, 4)
    entries = [((torch.randn(1, 4, 8),), {"attention_mask": mask}) for _ in range(3)]
    args, kwargs = stack_inputs(entries)
    assert args[0].shape == (3, 4, 8) and kwargs["attention_mask"] is mask
    entries.append(((torch.randn(1, 4, 8),), {"attention_mask": torch.zeros(1, 4)}))
    with pytest.raises(ValueError, match="differ in more than their hidden states"):
        stack_inputs(entries)
    assert find_blocks(tiny_vit())[0] == "vit.layers"
