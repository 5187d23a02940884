"""A given per-layer configuration of the supernet, for ``eqnet_search`` to evaluate and export.

A configuration is what a stage recorded per layer in report.json: ``eqnet_search``'s
``w_bits``, ``a_bits``, ``granularity``, ``w_symmetric``, ``a_symmetric``, or a search stage's
(``rco``, ``evopress``) ``setting`` of an eqnet candidate (``bits``, ``input_bits``,
``granularity``, ``symmetric``, ``input_symmetric``; :data:`compress_eqnet.offer.DEFAULTS`
for one it omits). It comes from an earlier stage of the same recipe (by its label) or
from a report.json (the last stage that recorded one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.api import Method, StageRecord, UserError
from compress_eqnet.offer import DEFAULTS
from compress_eqnet.supernet import Space, Subnet


def recorded(entry: dict[str, Any]) -> bool:
    """Whether a stage's per-layer entry holds an eqnet setting."""
    return "w_bits" in entry or "bits" in entry.get("setting", {})


RECORDERS = ("rco", "evopress", "eqnet_search")
"""The methods whose stages record per-layer eqnet settings (rco and evopress over eqnet's candidates)."""


def check_source(source: str, earlier: list[Method]) -> None:
    """At ``compress recipe check``: refuse a ``source`` that is neither the label of an earlier stage
    that records eqnet settings (the first so labelled, as :func:`from_stages` takes it; rco and
    evopress asking eqnet's candidates) nor a report.json that records some."""
    named = [method for method in earlier if method.label == source]
    if named:
        method = named[0]
        if method.name not in RECORDERS:
            raise UserError(
                f"stage {source!r} ({method.name}) records no per-layer eqnet settings (configuration: takes an "
                "earlier rco, evopress or eqnet_search stage, or a report.json)",
                "configuration",
            )
        providers = getattr(method.params, "providers", None)  # rco and evopress: None asks every provider
        if method.name != "eqnet_search" and providers is not None and "eqnet" not in providers:
            raise UserError(
                f"stage {source!r} ({method.name}) does not ask eqnet's candidates (providers {providers}), "
                "so it records no eqnet settings",
                "configuration",
            )
        return
    from_report(source, [method.label for method in earlier])


def from_stages(source: str, stages: list[StageRecord]) -> dict[str, dict[str, Any]]:
    """The per-layer entries of the earlier stage labelled ``source``, or of the last stage of the
    report.json at path ``source`` that recorded settings."""
    for stage in stages:
        if stage.name == source:
            if not any(recorded(entry) for entry in stage.layers.values()):
                raise UserError(f"stage {source!r} recorded no per-layer eqnet settings", "configuration")
            return stage.layers
    return from_report(source, [stage.name for stage in stages])


def from_report(source: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    """The per-layer entries of the last stage that recorded eqnet settings in the report.json at
    path ``source``; refuses a path that is no file, naming the earlier stages' ``labels``."""
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"{source!r} is neither the label of an earlier stage of this recipe (earlier stages: "
            f"{', '.join(labels) or 'none'}) nor a report.json",
            "configuration",
        )
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{source} is not JSON: {error}", "configuration") from None
    for stage in reversed(report.get("stages", [])):
        if any(recorded(entry) for entry in stage.get("layers", {}).values()):
            return stage["layers"]
    raise UserError(f"no stage of the report {source} recorded per-layer eqnet settings", "configuration")


def setting(entry: dict[str, Any]) -> tuple[int, int, bool, bool, bool]:
    """``(w_bits, a_bits, channel, w_symmetric, a_symmetric)`` of one layer's recorded entry."""
    if "w_bits" in entry:
        keys = ("w_bits", "a_bits", "granularity", "w_symmetric", "a_symmetric")
        w_bits, a_bits, granularity, w_symmetric, a_symmetric = (entry[key] for key in keys)
    else:
        given = {**{key: values[0] for key, values in DEFAULTS.items()}, **entry["setting"]}
        w_bits, a_bits = given["bits"], given["input_bits"]
        granularity, w_symmetric, a_symmetric = given["granularity"], given["symmetric"], given["input_symmetric"]
    return int(w_bits), int(a_bits), granularity == "channel", bool(w_symmetric), bool(a_symmetric)


def configured_subnet(entries: dict[str, dict[str, Any]], names: list[str], space: Space) -> Subnet:
    """The sub-network ``entries`` give the supernet's layers ``names`` (model order); refuses a layer
    without an entry and a value outside ``space`` (the first and last layer's bits, which the
    supernet holds at ``fixed_bits``, are not checked)."""
    rows = []
    for index, name in enumerate(names):
        if name not in entries or not recorded(entries[name]):
            raise UserError("the configuration has no eqnet setting for this layer of the supernet", name)
        row = setting(entries[name])
        fixed = index in (0, len(names) - 1)
        for key, value, allowed in (
            ("weight bits", row[0], None if fixed else space.w_bits),
            ("input bits", row[1], None if fixed else space.a_bits),
            ("granularity", row[2], space.channel),
            ("weight symmetry", row[3], space.w_symmetric),
            ("input symmetry", row[4], space.a_symmetric),
        ):
            if allowed is not None and value not in allowed:
                raise UserError(f"{key} {value} is outside the supernet's space ({list(allowed)})", name)
        rows.append(row)
    return Subnet(*(tuple(column) for column in zip(*rows)))
