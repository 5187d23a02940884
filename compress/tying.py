"""Untying weights that a stage compresses in place while another module shares them.

Most small language models tie the LM head to the input embedding. Quantizing or pruning
the head in place would silently change the embedding too; like LLM Compressor, the host
gives such a target its own copy of the weight first and records the model as untied, so
the written checkpoint stores both tensors and reloads them untied.
"""

from __future__ import annotations

from torch import nn


def untie_targets(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    """Give each target whose weight a non-target module shares its own copy; the names untied."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    untied = []
    for name, module in targets.items():
        weight = module.weight
        if any(owner not in targets for owner in owners.get(id(weight), [])):
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied.append(name)
    if untied:
        _record_untied(model)
    return untied


def _record_untied(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    for part in {id(config): config, id(text := config.get_text_config()): text}.values():
        part.tie_word_embeddings = False
