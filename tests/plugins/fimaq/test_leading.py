"""A calibration stage takes the targets the forward pass reaches before the blocks (a ViT's
patch embedding) first, as FIMA-Q's code reconstructs the patch embedding first: the blocks
then see its compressed output, and the original stream stays the stage's starting model's."""

from __future__ import annotations

import torch

from tests.models import tiny_vit_config
from tests.test_engine import RecordStreams, record_streams_without_a_recipe

PROJECTION = "vit.embeddings.patch_embeddings.projection"


class HalveAndRecord(RecordStreams):
    """Test method: records as record-streams does, then halves its targets' weights."""

    name = "halve-and-record"

    def compress_block(self, context, work):
        reports = super().compress_block(context, work)
        with torch.no_grad():
            for module in work.targets.values():
                module.weight.mul_(0.5)
        return reports


def vit_and_samples(count: int):
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()
    samples = [{"pixel_values": torch.randn(3, 16, 16), "labels": torch.tensor(1)} for _ in range(count)]
    return model, samples, torch.stack([sample["pixel_values"] for sample in samples])


def test_the_patch_embedding_goes_first_and_the_blocks_see_its_compressed_output():
    model, samples, pixels = vit_and_samples(3)
    with torch.no_grad():
        original_embeddings = model.vit.embeddings(pixels)
    targets = ["classifier", "vit.layers.1.mlp.fc1", PROJECTION]
    layers = record_streams_without_a_recipe(model, targets, samples, HalveAndRecord)
    seen = RecordStreams.seen
    assert list(seen) == [PROJECTION, "vit.layers.0", "vit.layers.1", "classifier"]
    assert list(layers) == [PROJECTION, "vit.layers.1.mlp.fc1", "classifier"]  # each target once
    index, _, inputs, original = seen[PROJECTION]
    assert index == -1
    assert torch.equal(inputs, pixels) and torch.equal(original, pixels)
    _, _, block_inputs, block_original = seen["vit.layers.0"]
    with torch.no_grad():
        compressed_embeddings = model.vit.embeddings(pixels)  # with the halved projection
    torch.testing.assert_close(block_inputs, compressed_embeddings)
    torch.testing.assert_close(block_original, original_embeddings)
    assert not torch.allclose(block_inputs, block_original)
    assert seen["classifier"][0] == 2  # after the two blocks, as before


def test_without_a_leading_target_the_order_and_streams_are_unchanged():
    model, samples, _ = vit_and_samples(2)
    record_streams_without_a_recipe(model, ["classifier", "vit.layers.0.mlp.fc1"], samples, HalveAndRecord)
    assert list(RecordStreams.seen) == ["vit.layers.0", "vit.layers.1", "classifier"]
    _, _, inputs, original = RecordStreams.seen["vit.layers.0"]
    assert torch.equal(inputs, original)
