"""What every one-shot pruner of the plugin is asked for: an ``N:M`` pattern or an unstructured fraction."""

from __future__ import annotations

from typing import Self

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.api import MethodParams, Produces, UserError, weight_matrix
from compress_nm.patterns import NMPattern, nm_keep_mask, unstructured_keep_mask


class SparsityParams(MethodParams):
    """``pattern`` (``"2:4"``: keep N of every M consecutive input weights of a row) or
    ``sparsity`` (the fraction of weights set to zero, anywhere), exactly one of them."""

    pattern: str | None = Field(
        None,
        description="N:M semi-structured sparsity: keep N of every M consecutive input weights of each "
        "row (N < M; M must divide every targeted layer's input width). 2:4 is what sparse tensor "
        "cores run.",
    )
    sparsity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Unstructured sparsity: the fraction of each layer's weights set to zero (0 < sparsity < 1).",
    )
    per_row: bool = Field(
        False,
        description="With sparsity: prune that fraction of every output row (the comparison group Wanda "
        "uses) instead of comparing the scores over the whole layer.",
    )

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        return None if value is None else str(NMPattern.parse(value))

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.pattern is None) == (self.sparsity is None):
            raise ValueError("give either pattern (N:M, e.g. 2:4) or sparsity (a fraction in (0, 1)), not both")
        if self.pattern is not None and "per_row" in self.model_fields_set:
            raise ValueError("per_row applies to unstructured sparsity; an N:M pattern is per row already")
        return self

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern, or None for unstructured sparsity."""
        return None if self.pattern is None else NMPattern.parse(self.pattern)

    @property
    def structure(self) -> str:
        """What ``LayerState.sparsity`` records: ``"N:M"`` or ``"unstructured"``."""
        return self.pattern or "unstructured"

    def check_width(self, name: str, module: nn.Module) -> None:
        """UserError naming the layer when M does not divide its input width."""
        pattern = self.nm
        width = weight_matrix(module.weight).shape[1]
        if pattern is not None and width % pattern.m:
            raise UserError(f"input width {width} is not a multiple of M={pattern.m} (pattern {pattern})", name)

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the best ``scores`` (rows, columns) under this pattern or fraction."""
        pattern = self.nm
        if pattern is not None:
            return nm_keep_mask(scores, pattern)
        return unstructured_keep_mask(scores, self.sparsity, self.per_row)


class Pruning:
    """What the plugin's pruners share (a mixin before their method class): Linear layers only,
    the width check at ``compress recipe check``, and the pattern they leave."""

    params: SparsityParams
    supported_modules = (nn.Linear,)

    def check_layer(self, name: str, module: nn.Module) -> None:
        self.params.check_width(name, module)

    def produces(self) -> Produces:
        return Produces(sparsity=self.params.structure)


def sparsity_report(weight: torch.Tensor) -> dict[str, float]:
    """What a pruner reports of a layer: the fraction of its weights that are zero."""
    return {"sparsity": round((weight == 0).float().mean().item(), 6)}
