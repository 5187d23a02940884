"""Which modules a stage acts on: ``targets`` and ``ignore`` entries.

An entry is one of
- ``re:<pattern>``: a regular expression matched (``re.match``) against the module's
  qualified name, e.g. ``re:.*mlp\\.(up|down)_proj$``;
- a class name, e.g. ``Linear`` or ``LlamaDecoderLayer``;
- a qualified module name, e.g. ``lm_head`` or ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import re

from torch import nn


def entry_matches(entry: str, name: str, module: nn.Module) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == type(module).__name__ or entry == name


def match_modules(model: nn.Module, targets: list[str], ignore: list[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """The modules selected by ``targets`` minus ``ignore``, and the targets that matched nothing."""
    selected: dict[str, nn.Module] = {}
    unmatched = list(targets)
    for name, module in model.named_modules():
        if not name:
            continue
        hits = [entry for entry in targets if entry_matches(entry, name, module)]
        for entry in hits:
            if entry in unmatched:
                unmatched.remove(entry)
        if hits and not any(entry_matches(entry, name, module) for entry in ignore):
            selected[name] = module
    return selected, unmatched


def invalid_patterns(entries: list[str]) -> list[tuple[int, str]]:
    """(index, error) for each ``re:`` entry that is not a valid regular expression."""
    problems = []
    for index, entry in enumerate(entries):
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as error:
                problems.append((index, f"invalid regular expression {entry[3:]!r}: {error}"))
    return problems
