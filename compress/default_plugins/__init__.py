"""Plugins that ship inside compress itself: IO, data, metrics and progress reporting.

They use the same hooks as any other plugin; the host registers them first.
"""
