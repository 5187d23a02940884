"""SR-STE: the dynamic mask, the refined gradient, SAD, and the srste stage on the two-layer SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.engine import apply_recipe
from compress.errors import UserError
from compress.validate import check_recipe
from compress_nm.patterns import NMPattern, is_nm_sparse, nm_keep_mask
from compress_nm.srste import attach, bake, dense_weight, nm_mask, sparse_architecture_divergence
from tests.conftest import WIKITEXT_TEST, WIKITEXT_VALID

TWO_FOUR = NMPattern(2, 4)


def srste_recipe(write_recipe, tmp_path, before=(), data=True, **stage):
    entries = {"evaluation": {"path": str(WIKITEXT_TEST), "samples": 2, "seq_len": 32}}
    if data:
        entries["train"] = {"path": str(WIKITEXT_VALID), "samples": 4, "seq_len": 32}
    return write_recipe(
        data=entries,
        stages=[
            *before,
            {
                "method": "srste",
                "steps": 4,
                "batch_size": 2,
                "lr": 1e-3,
                "schedule": "constant",
                "log_every": 2,
                "targets": ["re:.*mlp.*_proj$"],
                **stage,
            },
        ],
        output=None,
        evaluate=[],
    )


# --- the estimator ------------------------------------------------------------------------


def test_mask_is_recomputed_at_every_forward_when_weights_cross():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.4, -0.3, 0.2]]))
    attach(layer, TWO_FOUR, 2e-4)
    x = torch.ones(1, 4)
    assert torch.allclose(layer(x), torch.tensor([[0.4 - 0.3]]))
    with torch.no_grad():
        dense_weight(layer)[0, 0] = 0.5  # now larger than 0.4 and |-0.3|
    assert torch.equal(layer.weight, torch.tensor([[0.5, 0.4, 0.0, 0.0]]))
    assert torch.allclose(layer(x), torch.tensor([[0.9]]))


def test_dense_gradient_is_straight_through_plus_the_refined_term_exactly():
    torch.manual_seed(0)
    decay = 2e-4
    layer = nn.Linear(8, 3, bias=False)
    weight = layer.weight.detach().clone()
    x = torch.randn(5, 8)
    attach(layer, TWO_FOUR, decay)
    (layer(x) ** 2).sum().backward()
    mask = nm_keep_mask(weight.abs(), TWO_FOUR)
    sparse = (weight * mask).requires_grad_()
    (F.linear(x, sparse) ** 2).sum().backward()
    expected = sparse.grad + decay * (~mask) * weight
    assert torch.equal(dense_weight(layer).grad, expected)
    assert torch.equal(dense_weight(layer).grad[mask], sparse.grad[mask])  # kept weights: no extra term


def test_bake_leaves_the_mask_in_the_same_parameter():
    layer = nn.Linear(8, 2)
    parameter = layer.weight
    attach(layer, TWO_FOUR, 2e-4)
    bake(layer)
    assert layer.weight is parameter
    assert is_nm_sparse(layer.weight.detach(), TWO_FOUR)


def test_convolution_groups_run_along_input_channels():
    weight = torch.arange(2 * 4 * 1 * 2, dtype=torch.float).reshape(2, 4, 1, 2)
    mask = nm_mask(weight, TWO_FOUR)
    assert mask.shape == weight.shape
    # at each (output channel, kernel position) the two largest of the four input channels are kept
    assert torch.equal(mask.sum(dim=1), torch.full((2, 1, 2), 2))
    assert mask[:, 2:].all() and not mask[:, :2].any()


def test_sad_on_a_constructed_example():
    start = {"a": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), "b": torch.tensor([[1, 0, 1, 0]] * 2).bool()}
    later = {"a": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), "b": torch.tensor([[1, 0, 1, 0]] * 2).bool()}
    # layer a: two entries flipped of 4; layer b: none of 8
    assert sparse_architecture_divergence(later, start) == pytest.approx(2 / 12)
    assert sparse_architecture_divergence(start, start) == 0.0


# --- the stage ------------------------------------------------------------------------------


def test_srste_stage_bakes_n_m_masks_and_reports_sad(host, write_recipe, tmp_path):
    context = apply_recipe(host, check_recipe(host, srste_recipe(write_recipe, tmp_path, lr=0.05)))
    modules = dict(context.model.named_modules())
    record = context.report.stages[0]
    assert record.layers
    for name in record.layers:
        assert context.layers[name].sparsity == "2:4"
        assert is_nm_sparse(modules[name].weight.detach(), TWO_FOUR), name
        assert not hasattr(modules[name], "parametrizations")
    curve = record.details["sad_curve"]
    assert [step for step, _, _ in curve] == [2, 4]
    assert curve[-1][1] == pytest.approx(record.details["sad"])
    assert 0 < record.details["sad"] < 0.5  # a large lr moves some masks, not most
    assert "srste" not in context.state


def test_srste_after_a_fixed_mask_stage_moves_the_masks(host, write_recipe, tmp_path):
    recipe = srste_recipe(
        write_recipe,
        tmp_path,
        before=[{"method": "magnitude", "pattern": "2:4", "targets": ["re:.*mlp.*_proj$"]}],
        lr=0.05,
    )
    context = apply_recipe(host, check_recipe(host, recipe))
    record = context.report.stages[1]
    assert record.details["constrained_layers"] == 0  # the host's fixed-mask straight-through stepped aside
    assert record.details["sad"] > 0  # zeros of the one-shot stage came back to life
    losses = [loss for _, loss in record.details["loss_curve"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    modules = dict(context.model.named_modules())
    for name in record.layers:
        assert context.layers[name].method == "srste"
        assert is_nm_sparse(modules[name].weight.detach(), TWO_FOUR), name


def test_forward_kl_to_the_original_lowers_the_loss(host, write_recipe, tmp_path):
    recipe = srste_recipe(write_recipe, tmp_path, loss="forward_kl", steps=6, log_every=1, lr=2e-4, batch_size=4)
    record = apply_recipe(host, check_recipe(host, recipe)).report.stages[0]
    curve = [loss for _, loss in record.details["loss_curve"]]
    assert curve[-1] < curve[0], curve


# --- bad input ------------------------------------------------------------------------------


def test_srste_without_training_data_is_refused(host, write_recipe, tmp_path):
    with pytest.raises(UserError, match="reads data: train:, which the recipe lacks"):
        check_recipe(host, srste_recipe(write_recipe, tmp_path, data=False))


def test_width_not_divisible_by_m_names_the_layer(host, write_recipe, tmp_path):
    with pytest.raises(UserError, match="input width 576 is not a multiple of M=7") as error:
        check_recipe(host, srste_recipe(write_recipe, tmp_path, pattern="3:7"))
    assert "model.layers.0.mlp.gate_proj" in str(error.value)


def test_pattern_with_n_not_below_m_is_refused(host, write_recipe, tmp_path):
    with pytest.raises(UserError, match="needs 0 < N < M"):
        check_recipe(host, srste_recipe(write_recipe, tmp_path, pattern="4:4"))


def test_a_quantized_layer_is_refused_by_name(host, write_recipe, tmp_path):
    recipe = srste_recipe(write_recipe, tmp_path, before=[{"method": "rtn", "bits": 4, "group_size": 64}])
    with pytest.raises(UserError, match="quantized by an earlier stage .rtn.; .*after srste") as error:
        apply_recipe(host, check_recipe(host, recipe))
    assert "mlp" in str(error.value)
