"""Small random models shared by tests that need an architecture, not trained weights."""

from __future__ import annotations

from typing import Any


def tiny_vit_config(**overrides: Any):
    """A two-layer ViT config (width 32, 16x16 images in patches of 8); keywords override any field."""
    from transformers import ViTConfig

    fields = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 8,
    }
    return ViTConfig(**{**fields, **overrides})
