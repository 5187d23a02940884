"""The field's tools that a recipe names: experiment trackers (``report_to``) and
lm-evaluation-harness tasks (``evaluate: [{lm_eval: ...}]``), refused at ``compress recipe check``
when they cannot run, in one line that says what to install or which name was meant."""

from __future__ import annotations

from tests.faults.harness import Fault, recipe_setup

TRAINING = """model: {model}
data:
  train: {{path: {text}, samples: 4, seq_len: 32}}
stages:
  - method: distill
    losses: [{{loss: ce}}]
    batch_size: 2
    report_to: [tensorboard, wandb]
output: {{dir: {out}}}
"""

LM_EVAL = """model: {model}
stages:
  - {{method: rtn, bits: 4, group_size: 32}}
evaluate:
  - lm_eval:
      tasks: [hellaswg]
output: {{dir: {out}}}
"""

CASES = [
    Fault(
        id="integrations/tracker-not-installed",
        description="a training stage reporting to wandb where wandb is not installed (compress does not depend on it)",
        setup=recipe_setup(TRAINING),
        message="tracker 'wandb' is not installed: pip install wandb",
        place="recipe.yaml:8:16",
        must_not_exist=("out", "runs"),
    ),
    Fault(
        id="integrations/lm-eval-unknown-task",
        description="an lm-eval task name that the harness does not know (`hellaswg`)",
        setup=recipe_setup(LM_EVAL),
        message="unknown lm-eval task 'hellaswg' (did you mean 'hellaswag'?)",
        place="recipe.yaml:6:14",
        must_not_exist=("out",),
    ),
]
