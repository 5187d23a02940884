"""FIMA-Q's patch embedding search below 8-bit inputs (``patch.py``, after the code's
``AsymmetricallyBatchingQuantConv2d.hyperparameter_searching``), against a brute force."""

import torch
from compress_fimaq.patch import input_scales, search_conv
from torch import nn
from torch.nn import functional as F

from compress.api import PointScheme, QuantScheme, weight_matrix


def test_the_input_scale_is_the_best_symmetric_candidate_and_the_rounds_never_worsen():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 8, 4, 4)
    x = torch.randn(6, 3, 16, 16)
    weight = weight_matrix(conv.weight.detach())
    search = search_conv(conv, weight, QuantScheme(bits=3, symmetric=False), 16, x, PointScheme(bits=4), 32, 3)
    start, candidates = input_scales(x, 4, 32)
    torch.testing.assert_close(start, x.abs().max() / 7.5)  # max |x| / (2**(b-1) - 0.5)
    torch.testing.assert_close(candidates[[0, -1]], torch.stack([0.01 * start, 1.2 * start]))
    w_hat = search.grid.fake_quantize(weight).view_as(conv.weight).double()
    target = F.conv2d(x.double(), conv.weight.double(), stride=4)

    def error(scale: torch.Tensor) -> float:
        x_hat = (x.double() / scale).round().clamp(-8, 7) * scale  # the code's symmetric input grid
        return (F.conv2d(x_hat, w_hat, stride=4) - target).pow(2).sum().item()

    brute = torch.tensor([error(s.double()) for s in candidates])
    assert search.point.scale.item() == candidates[brute.argmin()].item()
    torch.testing.assert_close(
        search.point(x).double(),
        (x.double() / search.point.scale.double()).round().clamp(-8, 7) * search.point.scale.double(),
    )
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(search.errors[1:], search.errors[2:]))
    assert len(search.errors) == 4


def test_a_low_bit_patch_embedding_input_is_the_searched_symmetric_point(tmp_path):
    import yaml
    from transformers import ViTForImageClassification

    from compress.engine import apply_recipe
    from compress.host import PluginHost
    from compress.validate import check_recipe
    from tests.models import tiny_vit_config
    from tests.test_images import CLASSES, LABELS, save_classifier, write_images

    host = PluginHost()
    host.load_plugins()
    data = write_images(tmp_path / "images", CLASSES, 4)
    torch.manual_seed(0)
    model = save_classifier(ViTForImageClassification(tiny_vit_config(image_size=32, **LABELS)), tmp_path / "vit")
    stage = {"method": "fimaq", "targets": ["Conv2d"], "points": ["input"], "embedding_activation_bits": 4}
    stage |= {"iterations": 2, "batch_size": 4, "loss": "mse", "search_steps": 8, "weight_candidates": 8}
    raw = {
        "model": str(model),
        "data": {"calibration": {"path": str(data), "source": "images", "samples": 4}},
        "stages": [stage],
        "output": {"dir": str(tmp_path / "out"), "format": "dense"},
        "run": {"mode": "sequential", "device": "cpu"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    context = apply_recipe(host, check_recipe(host, tmp_path / "recipe.yaml"))
    point = context.points["vit.embeddings.patch_embeddings.projection:input"]
    assert point.scheme.bits == 4 and point.scale.numel() == 1
    assert point.zero_point.flatten().tolist() == [8.0]  # the code's symmetric grid, -8 .. 7
