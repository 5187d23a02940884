"""RepQ-ViT's LayerNorm reparameterization in fimaq: the fold keeps a random tiny ViT's outputs,
maps every channel's range onto the layer-wise one, and is found only where it is safe."""

from __future__ import annotations

import pytest
import torch
from compress_fimaq.method import FimaqParams
from compress_fimaq.points import grouped, observe, search_range
from compress_fimaq.reparam import fold, foldable, layer_target
from pydantic import ValidationError
from torch import nn

from compress.api import PointScheme, point_name
from tests.models import tiny_vit_config


@pytest.fixture
def vit():
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(image_size=32, num_labels=3)).eval()
    with torch.no_grad():  # LayerNorm affines away from 1 and 0, so that the fold has work to do
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    return model


def linear_inputs(model: nn.Module) -> list[str]:
    return [point_name(name, "input") for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_folding_every_layernorm_into_its_linears_keeps_the_outputs(vit):
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = vit(pixel_values=pixels).logits
    seen = observe(vit, linear_inputs(vit), lambda: vit(pixel_values=pixels))
    readers: dict[str, list[str]] = {}
    for point, norm in seen.after_norm.items():
        readers.setdefault(norm, []).append(point)
    modules = dict(vit.named_modules())
    folded = []
    for norm, points in readers.items():
        layers = [point.rpartition(":")[0] for point in points]
        assert seen.consumers[norm] == set(layers)
        scheme = PointScheme(bits=4, granularity="channel")
        scale, zero = search_range(grouped(seen.values[points[0]], "channel"), scheme, 8, torch.Generator())
        fold(modules[norm], [modules[name] for name in layers], scale, zero)
        folded.append(norm)
    # the final LayerNorm is not among them: the classifier reads a slice of its output (the class token)
    assert sorted(folded) == [f"vit.layers.{i}.layernorm_{where}" for i in (0, 1) for where in ("after", "before")]
    with torch.no_grad():
        after = vit(pixel_values=pixels).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_each_channel_range_lands_on_the_layer_range():
    scale = torch.tensor([0.5, 0.1, 0.02, 0.3])
    zero = torch.tensor([3.0, 7.0, 12.0, 0.0])
    target = layer_target(scale, zero)
    assert target.scale.item() == pytest.approx(scale.mean().item())
    assert target.zero_point.item() == round(zero.mean().item())
    levels = 15
    low, high = -zero * scale, (levels - zero) * scale
    torch.testing.assert_close(target.apply(low), (-target.zero_point * target.scale).expand(4))
    torch.testing.assert_close(target.apply(high), ((levels - target.zero_point) * target.scale).expand(4))


def test_a_layernorm_read_by_something_else_or_without_bias_is_not_folded():
    block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    seen = observe(block, [point_name("1", "input")], lambda: block(torch.randn(2, 8)))
    assert seen.after_norm == {"1:input": "0"} and seen.consumers == {"0": {"1"}}
    assert foldable(block[0], [block[1]])
    assert not foldable(nn.LayerNorm(8, bias=False), [block[1]])
    assert not foldable(block[0], [nn.Linear(8, 4, bias=False)])
    assert not foldable(nn.RMSNorm(8), [block[1]])

    class Shared(nn.Module):  # the norm's output also goes to a second, untargeted layer
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(8), nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            y = self.norm(x)
            return self.a(y) + self.b(y)

    shared = Shared()
    seen = observe(shared, [point_name("a", "input")], lambda: shared(torch.randn(2, 8)))
    assert seen.consumers["norm"] == {"a", "b"}  # so the fold (needing exactly {"a"}) is skipped


def test_asking_for_the_fold_without_channel_ranges_is_refused():
    assert FimaqParams(channel_inputs=False).reparameterize_layernorm  # the default does not conflict
    with pytest.raises(ValidationError, match="it needs channel_inputs: true and 'input' in points"):
        FimaqParams(reparameterize_layernorm=True, channel_inputs=False)
    with pytest.raises(ValidationError, match="it needs channel_inputs: true"):
        FimaqParams(reparameterize_layernorm=True, points=["query", "key"])
