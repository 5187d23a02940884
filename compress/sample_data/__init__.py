"""Small data samples shipped inside the package, named in recipes as ``path: builtin:<name>``.

They let the quickstart run from a plain clone; README.md beside them states each one's
source and license. :func:`resolve` turns the recipe's ``builtin:<name>`` into the file's
path (so every data source reads it as any file) and :func:`label` turns the path back
into the name for reports and model cards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import did_you_mean

PREFIX = "builtin:"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DataSample:
    name: str
    file: str
    hub_dataset: str
    """The Hub dataset the sample is taken from (what a model card lists)."""
    description: str


SAMPLES = {
    sample.name: sample
    for sample in (
        DataSample(
            "wikitext-2-test",
            "wikitext-2-test.txt",
            "Salesforce/wikitext",
            "WikiText-2 test split (wikitext-2-v1), first 165 KB; CC BY-SA 3.0",
        ),
    )
}


def resolve(path: str) -> str:
    """The file a ``builtin:<name>`` path names; any other path unchanged.

    Raises ValueError (which the recipe schema reports at the key) for an unknown name.
    """
    if not path.startswith(PREFIX):
        return path
    name = path.removeprefix(PREFIX)
    if name not in SAMPLES:
        raise ValueError(f"no shipped data sample named {name!r}{did_you_mean(name, list(SAMPLES))}")
    return str(HERE / SAMPLES[name].file)


def sample_at(path: str | Path) -> DataSample | None:
    """The shipped sample stored at ``path``, or None for any other file."""
    path = Path(path)
    if path.parent.resolve() != HERE:
        return None
    return next((sample for sample in SAMPLES.values() if sample.file == path.name), None)


def label(path: str | Path) -> str:
    """How reports name a data file: ``builtin:<name>`` for a shipped sample, else the path as given."""
    sample = sample_at(path)
    return PREFIX + sample.name if sample is not None else str(path)
