"""UOE on a tiny random Mixtral (the tiny Llama upcycled: 2 layers, 4 experts): attribution picks the
expert the router prefers, only that expert's slice and its router move, the anchor keeps the
forget tokens routed to it, a dense model is refused, and the upcycled SmolLM2 trains < 1 %."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from compress.errors import UserError
from compress.pytest_plugin import RecipeRun
from compress.validate import check_recipe
from compress_unlearn.experts import gate_probabilities
from scripts.upcycle_moe import moe_config, upcycle
from tests.plugins.unlearn.conftest import forget_batch, local_recipe
from tests.plugins.unlearn.conftest import qa_entry as entry

LAYER, EXPERT = "model.layers.1.mlp", 2


def router_inputs(model, batch, layer):
    """The hidden states entering ``layer``'s router on ``batch``'s real tokens."""
    seen = []
    handle = model.get_submodule(layer).gate.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])[batch["attention_mask"].reshape(-1).bool()]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_model_dir, qa_data):
    """The tiny Llama upcycled, with routers built so that the forget tokens prefer expert 2 of layer 1:
    every router zero (uniform gates) but that row, the forget tokens' mean router input."""
    directory = tmp_path_factory.mktemp("tiny-moe")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moe = upcycle(dense, experts=4, top_k=2, noise=0.05, router_std=1.0, seed=0).eval()
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
        mean = router_inputs(moe, forget_batch(qa_data, tokenizer, 2), LAYER).mean(0)
        moe.get_submodule(LAYER).gate.weight[EXPERT] = 3 * mean / mean.norm() ** 2
    moe.config.output_router_logits = False
    moe.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def run_moe(host, tmp_path):
    """Run a recipe as ``compress apply`` would, on the model it names (``run_recipe`` swaps in the dense one)."""
    from compress.engine import apply_recipe

    runs = iter(range(100))

    def run(recipe):
        path = write(tmp_path / f"recipe-{next(runs)}.yaml", recipe)
        return RecipeRun(apply_recipe(host, check_recipe(host, path)), path, None)

    return run


def write(path, recipe):
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def uoe_recipe(model_dir, qa_data, **stage):
    return {
        "model": str(model_dir),
        "data": {"forget": entry(qa_data / "forget10.jsonl", 2), "retain": entry(qa_data / "retain90.jsonl", 4)},
        "stages": [{"method": "uoe", "steps": 3, "batch_size": 2, "lr": 1e-2, "log_every": 1, **stage}],
        "run": {"device": "cpu", "mode": "whole"},
    }


def test_attribution_picks_the_expert_the_router_prefers(run_moe, moe_dir, qa_data):
    run = run_moe(uoe_recipe(moe_dir, qa_data, steps=1))
    chosen = run.report["stages"][0]["details"]["uoe"]
    assert (chosen["layer"], chosen["expert"]) == (LAYER, EXPERT)
    assert chosen["affinity"]["model.layers.0.mlp"] == pytest.approx([0.25] * 4)
    assert max(chosen["affinity"][LAYER]) == chosen["affinity"][LAYER][EXPERT] > 0.5


def test_dense_targets_are_left_out_of_attribution(run_moe, moe_dir, qa_data):
    targets = ["model.layers.0.mlp", "model.layers.0.self_attn"]
    run = run_moe(uoe_recipe(moe_dir, qa_data, steps=1, targets=targets))
    chosen = run.report["stages"][0]["details"]["uoe"]
    assert set(chosen["affinity"]) == {"model.layers.0.mlp"}
    assert chosen["layer"] == "model.layers.0.mlp"


def test_only_the_chosen_slice_and_its_router_move(run_moe, moe_dir, qa_data):
    """With npo as the loss: its reference model is the original MoE, loaded beside it."""
    before = AutoModelForCausalLM.from_pretrained(moe_dir).state_dict()
    run = run_moe(uoe_recipe(moe_dir, qa_data, loss="npo", layer="model.layers.0.mlp", expert=1))
    after = run.context.model.state_dict()
    assert after.keys() == before.keys()
    moved = {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    for name, value in after.items():
        if name in moved:
            assert not torch.equal(value[1], before[name][1]), name
            others = [e for e in range(4) if e != 1]
            assert torch.equal(value[others], before[name][others]), name
        elif name == "model.layers.0.mlp.gate.weight":
            assert not torch.equal(value, before[name])
        else:
            assert torch.equal(value, before[name]), name
    details = run.report["stages"][0]["details"]["uoe"]
    expert = sum(before[name][1].numel() for name in moved)
    assert details["trained_parameters"] == expert + before["model.layers.0.mlp.gate.weight"].numel()


def test_the_anchor_keeps_the_forget_tokens_on_the_expert(run_moe, moe_dir, qa_data, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = forget_batch(qa_data, tokenizer, 2)

    def expert_probability(model):
        router = model.get_submodule(LAYER).gate
        return gate_probabilities(router, router_inputs(model, batch, LAYER))[:, EXPERT].mean().item()

    original = expert_probability(AutoModelForCausalLM.from_pretrained(moe_dir).eval())
    kept = {}
    for weight in (0.0, 10.0):
        run = run_moe(uoe_recipe(moe_dir, qa_data, anchor_weight=weight, steps=4))
        kept[weight] = expert_probability(run.context.model.eval())
        curve = run.report["stages"][0]["details"]["loss_curve"]
        assert len(curve) == 4
    assert kept[10.0] > original
    assert kept[10.0] > kept[0.0]


def test_a_dense_model_is_refused_in_one_line(host, tiny_model_dir, qa_data, tmp_path):
    path = write(tmp_path / "recipe.yaml", uoe_recipe(tiny_model_dir, qa_data))
    with pytest.raises(UserError, match=r"no router: .*LlamaMLP has none") as refused:
        check_recipe(host, path)
    assert "\n" not in str(refused.value)


def test_layer_without_expert_is_refused(host, moe_dir, qa_data, tmp_path):
    path = write(tmp_path / "recipe.yaml", uoe_recipe(moe_dir, qa_data, layer=LAYER))
    with pytest.raises(UserError, match="give layer and expert together"):
        check_recipe(host, path)


@pytest.mark.parametrize("name", ["uoe-ga", "uoe-npo"])
def test_shipped_recipes_check(host, moe_dir, qa_data, tmp_path, name):
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "unlearn-moe" / f"{name}.yaml"
    models = {"moe-target": moe_dir, "moe-retain90": moe_dir}
    check_recipe(host, local_recipe(recipe, qa_data, models, 4, tmp_path))
    assert not (tmp_path / "out").exists()


def test_upcycled_smollm2_trains_under_one_percent():
    """From SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M-Instruct), upcycled to 8 experts:
    one expert's fused slices plus its layer's router, over every parameter (built on meta)."""
    from transformers import MixtralForCausalLM

    smollm2 = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        moe = MixtralForCausalLM(moe_config(smollm2, experts=8, top_k=2, aux_coef=0.02))
    total = sum(p.numel() for p in moe.parameters())
    block = moe.model.layers[0].mlp
    trained = sum(p[0].numel() for p in block.experts.parameters()) + block.gate.weight.numel()
    assert trained == 3 * 576 * 1536 + 8 * 576
    assert trained / total < 0.01
