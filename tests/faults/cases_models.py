"""Model directories with a bad config.json or shards, beyond tests/faults/cases_models_basic.py:
each is refused by ``compress recipe check`` (or ``apply``) in one line naming the checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.faults.cases_models_basic import damaged, damaged_file, edit_config
from tests.faults.harness import Fault


def config_bytes(content: bytes) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        (model / "config.json").write_bytes(content)

    return damage


def config_values(**values: object) -> Callable[[Path], None]:
    """A damage setting config.json keys (a value of None removes the key)."""

    def edit(config: dict) -> None:
        for key, value in values.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value

    return edit_config(edit)


def sharded_with_a_shard_missing(model: Path) -> None:
    """An index naming two shards, only the first of which exists."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:5]}, model / "model-00001-of-00002.safetensors")
    weight_map = {name: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, name in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


remote_code = config_values(
    model_type="my-custom-llama",
    auto_map={"AutoConfig": "configuration_custom.MyConfig", "AutoModelForCausalLM": "modeling_custom.MyModel"},
)
"""A damage making the architecture custom code that the directory does not hold."""


CASES = [
    Fault(
        id="model/config-empty",
        description="an empty (0-byte) config.json",
        setup=damaged(config_bytes(b"")),
        message="config.json is empty",
        place="model/config.json",
    ),
    Fault(
        id="model/config-json-list",
        description="config.json holding a JSON list `[1, 2]`",
        setup=damaged(config_bytes(b"[1, 2]")),
        message="config.json holds a JSON list, not an object",
        place="model/config.json",
    ),
    Fault(
        id="model/config-not-utf8",
        description="config.json in Latin-1 (`\\xe9` in a string)",
        setup=damaged(config_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')),
        message="config.json is not UTF-8 text",
        place="model/config.json",
    ),
    Fault(
        id="model/config-json-error-located",
        description="config.json with a trailing comma on line 3",
        setup=damaged(config_bytes(b'{\n  "model_type": "llama",\n  "hidden_size": 64,\n}\n')),
        message="config.json is not valid JSON",
        place="model/config.json:4:1",
    ),
    Fault(
        id="model/config-without-model-type",
        description="config.json without `model_type`",
        setup=damaged(config_values(model_type=None)),
        message="no model_type",
        place="model/config.json",
    ),
    Fault(
        id="model/config-value-of-wrong-type",
        description='config.json with `"hidden_size": "sixty-four"`',
        setup=damaged(config_values(hidden_size="sixty-four")),
        message="config.json",
        place="model",
    ),
    Fault(
        id="model/heads-do-not-divide-width",
        description="config.json with 5 attention heads for a width of 64",
        setup=damaged(config_values(num_attention_heads=5, num_key_value_heads=5)),
        message="is not a multiple of the number of attention heads",
        place="model",
    ),
    Fault(
        id="model/index-names-missing-shard",
        description="model.safetensors.index.json naming a shard that is not there",
        setup=damaged(sharded_with_a_shard_missing),
        message="model.safetensors.index.json names model-00002-of-00002.safetensors, which is not in the directory",
        place="model",
    ),
    Fault(
        id="model/remote-code-with-auto-config",
        description="config.json with an unknown `model_type` and `auto_map` (AutoConfig in custom code)",
        setup=damaged(remote_code),
        message="trust_remote_code: true",
        place="model",
    ),
    Fault(
        id="model/trusted-remote-code-missing",
        description="`trust_remote_code: true`, but the custom code named by `auto_map` is not in the directory",
        setup=damaged(remote_code, trust_remote_code=True),
        message="unreadable config.json",
        place="model",
    ),
    Fault(
        id="model/model-is-a-text-file",
        description="`model:` names a text file",
        setup=damaged_file("weights.txt", b"not a model\n"),
        message="not a built-in model name",
        place="recipe.yaml:1:8",
    ),
]
