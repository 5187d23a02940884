"""Library warnings during training reach the console once each, on lines of their own, not inside the bar."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import yaml
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from compress.library_warnings import warnings_above_the_bar


def test_each_distinct_warning_is_written_once_above_the_bar(capsys):
    transformers_logger = logging.getLogger("transformers")
    handlers = list(transformers_logger.handlers)
    propagate = transformers_logger.propagate
    bar = tqdm(total=3, desc="train", file=sys.stderr)
    with warnings_above_the_bar():
        for step in range(3):
            logging.getLogger("accelerate.utils.other").warning("Removed shared tensor {'lm_head.weight'} while saving")
            warnings.warn("use_reentrant should be passed\n explicitly", UserWarning, stacklevel=1)
            transformers_logging.get_logger("transformers.modeling_utils").warning_once(f"a note {step % 2}")
            logging.getLogger("accelerate").info("not a warning")
            bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    lines = [part for line in err.splitlines() for part in line.split("\r") if part.startswith("warning")]
    assert lines == [
        "warning (accelerate.utils.other): Removed shared tensor {'lm_head.weight'} while saving",
        "warning (UserWarning): use_reentrant should be passed explicitly",
        "warning (transformers.modeling_utils): a note 0",
        "warning (transformers.modeling_utils): a note 1",
    ]
    assert "not a warning" not in err
    assert transformers_logger.handlers == handlers and transformers_logger.propagate == propagate
    assert not any(type(handler).__name__ == "_OnceHandler" for handler in logging.getLogger().handlers)


def test_the_shared_tensor_warning_of_checkpoint_saves_is_one_clean_line(tiny_model_dir, tiny_text_file, tmp_path):
    """The tiny model ties its embeddings, so accelerate warns at each of the three checkpoint saves."""
    data = {"path": str(tiny_text_file), "samples": 4, "seq_len": 32}
    recipe = {
        "model": str(tiny_model_dir),
        "data": {"train": data},
        "stages": [
            {
                "method": "distill",
                "losses": [{"loss": "ce"}],
                "steps": 4,
                "batch_size": 2,
                "lr": 1e-4,
                "log_every": 1,
                "checkpoint_every": 1,
            }
        ],
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = subprocess.run(
        [sys.executable, "-m", "compress", "apply", str(tmp_path / "recipe.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    segments = [part for line in run.stderr.splitlines() for part in line.split("\r")]
    shared = [part for part in segments if "Removed shared tensor" in part]
    assert len(shared) == 1 and shared[0].startswith("warning (accelerate.utils.other): ")
