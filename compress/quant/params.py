"""The recipe parameters every weight-quantizing method extends.

A quantizer's ``bits``, ``symmetric``, ``granularity`` and ``group_size`` mean the same in
every method because they are one set of fields, :class:`QuantParams`; a method adds its
own fields and names the granularities it implements. The width check (the group size
divides the input width of each targeted layer) is not a method's job: ``compress recipe
check`` applies :func:`compress.quant.grid.check_group_width` to the scheme the stage
``produces()``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import model_validator

from compress.method import MethodParams
from compress.quant.grid import QuantScheme

Granularity = Literal["tensor", "channel", "group"]


class QuantParams(QuantScheme, MethodParams):
    """Parameters of a weight quantizer: its grid (the fields of :class:`QuantScheme`) plus
    whatever the method adds. ``group_size: null`` means one scale per output channel
    (``granularity: channel``) in every method."""

    granularities: ClassVar[tuple[Granularity, ...]] = ("tensor", "channel", "group")
    """The granularities the method implements; a recipe asking for another is refused."""

    @model_validator(mode="after")
    def _granularity_is_implemented(self) -> Self:
        if self.granularity not in self.granularities:
            raise ValueError(
                f"granularity {self.granularity!r} is not available here (choose from {', '.join(self.granularities)})"
            )
        return self

    def scheme(self) -> QuantScheme:
        """The weight grid alone, as layers record it and writers store it."""
        return QuantScheme(**self.model_dump(include=set(QuantScheme.model_fields)))
