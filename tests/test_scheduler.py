"""Learning-rate schedules come from ``transformers.get_scheduler``; their state survives a resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compress.training.method import TrainParams


def learning_rates(params: TrainParams, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=params.lr)
    scheduler = params.scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_warms_up_from_zero_then_decays_to_zero():
    rates = learning_rates(TrainParams(steps=10, warmup_steps=2, lr=1.0, schedule="cosine"), 11)
    assert rates[:3] == [0.0, 0.5, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(rates[2:]))
    assert rates[10] == pytest.approx(0.0)


def test_warmup_ratio_is_rounded_up_as_in_the_trainer():
    params = TrainParams(steps=10, warmup_ratio=0.25, lr=1.0, schedule="constant_with_warmup")
    assert params.warmup == 3
    assert learning_rates(params, 5) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])


def test_a_schedule_parameter_reaches_the_schedule():
    params = TrainParams(steps=10, lr=1.0, schedule="cosine_with_min_lr", schedule_kwargs={"min_lr_rate": 0.1})
    assert learning_rates(params, 11)[10] == pytest.approx(0.1)
    linear = learning_rates(TrainParams(steps=4, lr=1.0, schedule="linear"), 5)
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"schedule": "cosine_with_min_lr"}, "schedule cosine_with_min_lr: .*min_lr"),
        (
            {"schedule": "cosine_with_restarts", "schedule_kwargs": {"cycles": 2}},
            "unexpected keyword argument 'cycles'",
        ),
        ({"schedule": "constant", "warmup_steps": 5}, "use constant_with_warmup"),
        ({"warmup_steps": 5, "warmup_ratio": 0.1}, "not both"),
        ({"schedule": "reduce_lr_on_plateau"}, "Input should be 'constant'"),
    ],
)
def test_a_schedule_transformers_cannot_build_is_refused_with_its_reason(given, message):
    with pytest.raises(ValidationError, match=message):
        TrainParams(steps=10, **given)


def test_a_resumed_schedule_continues_at_its_step_over_the_new_total():
    """What a checkpoint keeps (the scheduler's state dict) restores the step; a resumed
    run with more ``steps`` builds the schedule over the new total."""
    model = nn.Parameter(torch.zeros(1))
    first = TrainParams(steps=6, warmup_steps=1, lr=1.0)
    optimizer = torch.optim.SGD([model], lr=1.0)
    scheduler = first.scheduler(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()

    longer = TrainParams(steps=10, warmup_steps=1, lr=1.0)
    resumed_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = longer.scheduler(resumed_optimizer)
    resumed.load_state_dict(saved)
    rates = []
    for _ in range(7):
        resumed_optimizer.step()
        resumed.step()
        rates.append(resumed_optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx(learning_rates(longer, 11)[4:])
