"""Calibration, training and evaluation data: the data source contract and plain text files."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from compress.errors import UserError
from compress.recipe import DataSpec


class DataSource(Protocol):
    """Reads a recipe's ``data:`` entry. Register instances with ``compress_register_data_sources``."""

    name: str

    def check(self, spec: DataSpec) -> None:
        """Raise UserError for a spec that cannot be read (missing file), before any model loads."""

    def load(self, spec: DataSpec, tokenizer: Any) -> list[torch.Tensor]:
        """``spec.samples`` 1-D token-id tensors of ``spec.seq_len`` tokens each."""


class TextFileSource:
    """A UTF-8 text file, tokenized as one stream and cut into consecutive windows.

    The windows do not overlap and no special tokens are added, so perplexity over them
    is the usual strided-free evaluation with context length ``seq_len``.
    """

    name = "text"

    def check(self, spec: DataSpec) -> None:
        if not spec.path.is_file():
            raise UserError("data file not found", str(spec.path))

    def load(self, spec: DataSpec, tokenizer: Any) -> list[torch.Tensor]:
        self.check(spec)
        if tokenizer is None:
            raise UserError("text data needs a tokenizer, and the model has none", str(spec.path))
        text = spec.path.read_text(encoding="utf-8")
        needed = spec.samples * spec.seq_len
        # tokenizing a prefix is enough; 8 characters per token is a generous bound
        ids = tokenizer(text[: needed * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < needed:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < needed:
            raise UserError(
                f"has {ids.numel()} tokens, fewer than samples x seq_len = "
                f"{spec.samples} x {spec.seq_len} = {needed}",
                str(spec.path),
            )
        return list(ids[:needed].view(spec.samples, spec.seq_len).unbind(0))
