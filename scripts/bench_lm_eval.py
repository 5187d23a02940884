"""lm-evaluation-harness through compress: SmolLM2-135M-Instruct against its 3-bit RTN copy.

A local harness task (rolling log-likelihood over WikiText-2 test paragraphs, from
``../shared/data``: nothing downloaded) runs as an ``evaluate:`` entry of a recipe, on the
models in memory; the script prints and writes the report's evaluation rows with the run's
wall time.

    python -m scripts.bench_lm_eval                 # SmolLM2 on the CPU, 16 paragraphs
    python -m scripts.bench_lm_eval --smoke         # the tiny random test model, 4 paragraphs
    python -m scripts.bench_lm_eval --paragraphs 200 --out docs/results/lm_eval_wikitext2.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from scripts.common import environment

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
TASK = """task: wikitext2_paragraphs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_task(directory: Path, paragraphs: int) -> None:
    """The task YAML and its data: the first ``paragraphs`` WikiText-2 test lines of 40 words or more."""
    lines = [line.strip() for line in WIKITEXT_TEST.read_text(encoding="utf-8").splitlines()]
    chosen = [line for line in lines if len(line.split()) >= 40][:paragraphs]
    data = directory / "wikitext2_paragraphs.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in chosen), encoding="utf-8")
    (directory / "wikitext2_paragraphs.yaml").write_text(TASK.format(data=data), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the tiny random model instead of SmolLM2")
    parser.add_argument("--paragraphs", type=int, default=16)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    from compress.engine import apply_recipe
    from compress.host import get_host
    from compress.validate import check_recipe

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        write_task(work, 4 if args.smoke else args.paragraphs)
        if args.smoke:
            from compress.pytest_plugin import build_tiny_model

            model, group_size = str(build_tiny_model(work / "tiny")), 32
        else:
            model, group_size = "smollm2-135m-instruct", 64
        recipe = {
            "model": model,
            "stages": [{"method": "rtn", "bits": args.bits, "group_size": group_size, "symmetric": True}],
            "evaluate": [{"lm_eval": {"tasks": ["wikitext2_paragraphs"], "include_path": str(work)}}],
        }
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
        started = time.perf_counter()
        host = get_host()
        context = apply_recipe(host, check_recipe(host, work / "recipe.yaml"))
        seconds = time.perf_counter() - started
    rows = {key: value for key, value in context.report.evaluation.items() if key.startswith("lm_eval/")}
    for key, row in rows.items():
        print(f"{key}: original {row['original']:.4f}, compressed {row['compressed']:.4f} ({row['samples']} docs)")
    print(f"wall time {seconds:.1f} s (load, rtn, two harness runs)")
    if args.out is not None:
        result = {
            "model": model if not args.smoke else "tiny random llama",
            "stage": recipe["stages"][0],
            "paragraphs": args.paragraphs,
            "evaluation": rows,
            "seconds": seconds,
            "environment": environment(str(context.device)),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
