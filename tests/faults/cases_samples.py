"""Data samples shipped inside the package (``path: builtin:<name>``): an unknown name is
refused at ``recipe check``, at its key, with a did-you-mean."""

from __future__ import annotations

from tests.faults.harness import Fault, recipe_setup

CASES = [
    Fault(
        id="data/unknown-shipped-sample",
        description="`path: builtin:wikitext2` (the shipped sample is builtin:wikitext-2-test)",
        setup=recipe_setup(data={"evaluation": {"path": "builtin:wikitext2", "samples": 4, "seq_len": 32}}),
        message="no shipped data sample named 'wikitext2' (did you mean 'wikitext-2-test'?)",
        place="recipe.yaml:",
    ),
]
