"""``rtn_reference: false`` skips the report-only round-to-nearest comparison and nothing else."""

from __future__ import annotations

import torch


def test_rtn_reference_off_gives_the_same_weights(run_recipe):
    runs = {
        flag: run_recipe({"stages": [{"method": "gptq", "bits": 4, "group_size": 32, "rtn_reference": flag}]})
        for flag in (True, False)
    }
    on, off = (runs[flag].context for flag in (True, False))
    for (name, a), (_, b) in zip(on.model.state_dict().items(), off.model.state_dict().items()):
        assert torch.equal(a, b), name
    layers_on, layers_off = on.report.stages[0].layers, off.report.stages[0].layers
    assert all(details["rtn_objective"] is None for details in layers_off.values())
    assert all(layers_on[name]["objective"] == details["objective"] for name, details in layers_off.items())
    assert all(layers_on[name]["rtn_objective"] > 0 for name in layers_off)
