"""Which modules a stage acts on: ``targets`` and ``ignore`` entries, with LLM Compressor's semantics.

Matching is compressed-tensors' (``compressed_tensors.utils.match``, the matcher LLM
Compressor and vLLM use), so a recipe's entries mean what they mean there. An entry is one of

- ``re:<pattern>``: a regular expression matched (``re.match``, so anchored at the start
  only) against the module's qualified name, e.g. ``re:.*mlp\\.(up|down)_proj$``;
- a class name, e.g. ``Linear`` or ``LlamaDecoderLayer``, which matches a module whose class
  *or any base class* has that name (``Linear`` also selects subclasses of ``nn.Linear``);
- a qualified module name, matched exactly, e.g. ``lm_head`` or ``model.layers.0.self_attn.q_proj``.

A module is selected when some target matches it and no ``ignore`` entry does.
compressed-tensors' internal modules (e.g. its transform and observer modules) never match.
Our choices on top: the model itself (the root, named ``""``) is never selected, and a
target that matches no module is reported (``compress recipe check`` refuses it, naming
module names close to it).
"""

from __future__ import annotations

import difflib
import re

from torch import nn


def entry_matches(entry: str, name: str, module: nn.Module) -> bool:
    """Whether one ``targets``/``ignore`` entry matches the module ``name``."""
    from compressed_tensors.utils.match import is_match

    return is_match(name, module, entry)


def match_modules(model: nn.Module, targets: list[str], ignore: list[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """The modules selected by ``targets`` minus ``ignore``, and the targets that matched nothing.

    A target counts as matched when it matches some module, ignored or not (so ``ignore``
    removing all of a target's modules is "selects no module", not "matches nothing").
    """
    from compressed_tensors.utils.match import is_match

    selected: dict[str, nn.Module] = {}
    unmatched = list(targets)
    for name, module in model.named_modules():
        if not name:
            continue
        hits = [entry for entry in unmatched if is_match(name, module, entry)]
        for entry in hits:
            unmatched.remove(entry)
        if is_match(name, module, targets, ignore):
            selected[name] = module
    return selected, unmatched


def names_near(model: nn.Module, entry: str, count: int = 4) -> list[str]:
    """Module names and class names of ``model`` close to ``entry``, for a "matches no module" message.

    A name or class name is compared with every qualified name and class name; a ``re:``
    pattern's words (its punctuation dropped) with the names' last components, layer numbers
    folded (``layers.N``) so that ``q_proj`` stands for every block's. When nothing is close,
    the Linear layers' names.
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    classes = {type(module).__name__: type(module).__name__ for _, module in modules}
    if entry.startswith("re:"):
        choices = {name.rsplit(".", 1)[-1]: re.sub(r"\.\d+\.", ".N.", name) for name, _ in reversed(modules)}
        words = re.sub(r"[\\^$.*+?()\[\]{}|]", " ", entry.removeprefix("re:")).split()
    else:
        choices, words = {name: name for name, _ in modules}, [entry]
    choices.update(classes)
    close = [hit for word in words for hit in difflib.get_close_matches(word, list(choices), n=count, cutoff=0.6)]
    if not close:
        linear = [re.sub(r"\.\d+\.", ".N.", name) for name, module in modules if isinstance(module, nn.Linear)]
        return list(dict.fromkeys(linear))[:count]
    return list(dict.fromkeys(choices[hit] for hit in close))[:count]


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
