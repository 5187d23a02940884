"""Hostile recipe files: alias bombs, recursion, depth, size, bytes that are not UTF-8 text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.harness import RECIPE_HEAD, Fault, recipe_argv, recipe_setup, tiny_model

VALID_HEAD = RECIPE_HEAD + "  - method: rtn\n"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A billion-laughs recipe: each of ``levels`` anchors is a list of ``width`` aliases of the one before."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]" for level in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def raw_recipe(data: bytes, command: str = "check") -> Callable[[Path], list[str]]:
    """A setup writing ``recipe.yaml`` as the bytes ``data`` (``{model}`` replaced by the tiny model)."""

    def setup(work: Path) -> list[str]:
        filled = data.replace(b"{model}", str(tiny_model()).encode()).replace(b"{out}", str(work / "out").encode())
        (work / "recipe.yaml").write_bytes(filled)
        return recipe_argv(command)

    return setup


def literal(text: str) -> str:
    """``text`` with braces doubled, for :func:`recipe_setup`'s ``str.format``."""
    return text.replace("{", "{{").replace("}", "}}")


CASES = [
    Fault(
        id="recipe/alias-bomb",
        description="YAML alias-expansion bomb (9 levels x 9 aliases, 387 million values), 1 GB memory limit",
        setup=recipe_setup(literal(alias_bomb())),
        message="aliases expand this to more than 100000 values",
        place="recipe.yaml:6:5",
        subprocess=True,
        memory_limit_mb=1024,
        timeout=60,
    ),
    Fault(
        id="recipe/alias-bomb-apply",
        description="`compress apply` on a valid recipe followed by an alias bomb (6 levels x 10 aliases)",
        setup=recipe_setup(VALID_HEAD + "    bits: 4\n" + literal(alias_bomb(6, 10)), command="apply"),
        message="aliases expand this to more than 100000 values",
        place="recipe.yaml:11:5",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/too-many-aliases",
        description="101 aliases of one anchor",
        setup=recipe_setup(VALID_HEAD + "    bits: &b 4\n    x: [" + ", ".join(["*b"] * 101) + "]\n"),
        message="too many aliases (more than 100)",
        place="recipe.yaml:6:",
    ),
    Fault(
        id="recipe/recursive-alias",
        description="an anchor that contains an alias of itself (`a: &a [*a]`)",
        setup=recipe_setup(VALID_HEAD + "    bits: 4\n    loop: &a [1, *a]\n"),
        message="recursive alias *a",
        place="recipe.yaml:6:",
    ),
    Fault(
        id="recipe/deep-nesting",
        description="a value nested 10,000 lists deep",
        setup=recipe_setup(VALID_HEAD + "    bits: 4\n    x: " + "[" * 10_000 + "]" * 10_000 + "\n"),
        message="nested deeper than 64 levels",
        place="recipe.yaml:6:",
    ),
    Fault(
        id="recipe/oversized",
        description="a 2 MiB recipe (a valid one followed by comments)",
        setup=recipe_setup(VALID_HEAD + "    bits: 4\n" + "#" * 2_000_000 + "\n"),
        message="larger than 1 MiB",
        place="recipe.yaml",
    ),
    Fault(
        id="recipe/not-utf8",
        description="a Latin-1 byte in a comment of the recipe",
        setup=raw_recipe(b"model: {model}\noutput: {dir: {out}}\n# caf\xe9\nstages:\n  - method: rtn\n"),
        message="not UTF-8 text: byte 0xe9 at byte offset",
        place="recipe.yaml:3:6",
    ),
    Fault(
        id="recipe/utf16",
        description="the recipe saved as UTF-16 (with a byte-order mark)",
        setup=raw_recipe("model: x\nstages: []\n".encode("utf-16")),
        message="not UTF-8 text: byte 0xff at byte offset 0",
        place="recipe.yaml:1:1",
    ),
    Fault(
        id="recipe/binary-garbage",
        description="`compress apply` on a file of random bytes",
        setup=raw_recipe(bytes(range(256)) * 4, command="apply"),
        message="not UTF-8 text",
        place="recipe.yaml:",
        must_not_exist=("out",),
    ),
    Fault(
        id="recipe/nul-character",
        description="a NUL character inside a value",
        setup=raw_recipe(b"model: {model}\noutput: {dir: {out}}\nstages:\n  - method: rtn\n    bits: 4\x00\n"),
        message="character U+0000 is not allowed",
        place="recipe.yaml:5:12",
    ),
    Fault(
        id="recipe/huge-integer",
        description="`bits:` with 5,000 digits",
        setup=recipe_setup(VALID_HEAD + "    bits: " + "9" * 5000 + "\n"),
        message="Exceeds the limit (4300 digits)",
        place="recipe.yaml:5:11",
    ),
    Fault(
        id="recipe/python-tag",
        description="a `!!python/object/apply:os.system` tag",
        setup=recipe_setup(VALID_HEAD + "    bits: !!python/object/apply:os.system ['touch pwned']\n"),
        message="could not determine a constructor",
        place="recipe.yaml:5:11",
        must_not_exist=("pwned",),
    ),
]
