"""GraphReplay: eager off CUDA; on CUDA, one eager run, then replays of the captured graph."""

from __future__ import annotations

import pytest
import torch

from compress.api import GraphReplay


def test_off_cuda_every_call_runs_the_function():
    calls = []
    replay = GraphReplay(torch.device("cpu"))
    for _ in range(3):
        replay.run("key", lambda: calls.append(1))
    assert len(calls) == 3
    assert replay.captured == 0 and not replay.enabled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_on_cuda_the_first_call_runs_eagerly_and_later_ones_replay():
    counter = torch.zeros((), device="cuda")
    calls = []

    def step():
        calls.append(1)
        counter.add_(1)

    replay = GraphReplay(torch.device("cuda"))
    for _ in range(4):
        replay.run("key", step)
    assert counter.item() == 4  # the capture itself did not add
    assert len(calls) == 2 and replay.captured == 1  # the eager run and the capture; then replays
