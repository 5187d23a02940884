"""compress: plugin-based model compression. Recipes in, Hugging Face checkpoints out.

A plugin imports :data:`hookimpl` from here and everything else it needs from
:mod:`compress.api`.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("compress")
"""Decorator that marks a function as an implementation of a ``compress_*`` hook."""

__all__ = ["__version__", "hookimpl"]
