"""The plugin's command: ``compress semi-structured CHECKPOINT`` (the 2:4 speed path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from compress.api import UserError

DTYPES = ("bfloat16", "float16")
BACKENDS = ("cusparselt", "cutlass")


def add_commands(cli: click.Group) -> None:
    """Add ``semi-structured`` to the ``compress`` command group."""

    @cli.command("semi-structured")
    @click.argument("checkpoint", type=click.Path(path_type=Path, exists=True, file_okay=False))
    @click.option(
        "--layer",
        "layers",
        multiple=True,
        help="A layer to accelerate, by name or re:PATTERN (repeatable); default: the layers the "
        "checkpoint's sparsity_config marks 2:4.",
    )
    @click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True, help="Prefill length.")
    @click.option("--reps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed repetitions.")
    @click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
    @click.option("--device", default="cuda", show_default=True)
    @click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="cusparselt",
        show_default=True,
        help="torch's semi-structured kernels: cuSPARSELt or CUTLASS.",
    )
    @click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results here.")
    def semi_structured(
        checkpoint: Path,
        layers: tuple[str, ...],
        tokens: int,
        reps: int,
        dtype: str,
        device: str,
        backend: str,
        json_path: Path,
    ) -> None:
        """Run CHECKPOINT's 2:4 layers on semi-structured sparse kernels and time prefill against dense.

        Every selected layer is verified to be 2:4 first (a broken one is named, exit 2);
        then, on a CUDA GPU of compute capability 8.0+, each Linear shape and the whole
        model's prefill are timed dense and sparse, launched eagerly and replayed from a
        CUDA graph (which drops the host's per-call work).
        """
        import torch

        from compress_nm.semi_structured import report_lines, run

        try:
            try:
                target = torch.device(device)
            except RuntimeError:
                raise UserError(f"not a device: {device!r} (e.g. cuda, cuda:1)", "--device") from None
            result = run(checkpoint, list(layers), target, getattr(torch, dtype), tokens, reps, backend)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        for line in report_lines(result):
            click.echo(line)
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=2) + "\n")
