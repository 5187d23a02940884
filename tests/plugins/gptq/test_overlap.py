"""``overlap``: the solves of a Hessian pass on two lanes, and blocks moved ahead of use and
written back behind it, change when work runs, never its result.

On the CPU the lanes run one after the other (the same orchestration as on CUDA, where each
lane is a thread with a stream of its own) and the block mover is off, so overlap on and off
must give the same weights, grids and objectives, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_gptq.method as gptq_method
from compress.devices import BlockMover, StagingBuffer, _Prefetch, onloaded

TIMES = {"seconds", "hessian_seconds", "rtn_seconds"}


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4, "group_size": 32},
        {"bits": 3, "group_size": 32, "act_order": True, "symmetric": False},
        {"bits": 4, "group_size": None, "granularity": "channel"},
    ],
)
def test_overlap_gives_the_serial_result(run_recipe, monkeypatch, settings):
    lanes = []
    solve_lanes = gptq_method._solve_lanes

    def spy(groups, device, kernels):
        lanes.append([group.width for group in groups])
        return solve_lanes(groups, device, kernels)

    monkeypatch.setattr(gptq_method, "_solve_lanes", spy)
    runs = {}
    for overlap in (False, True):
        stage = {"method": "gptq", **settings, "overlap": overlap}
        runs[overlap] = run_recipe({"stages": [stage], "output": None}).context
    # per block of the tiny Llama: q/k/v, o, gate/up (hidden wide) and down (intermediate wide)
    assert len(lanes) == 2 and all(len(widths) == 4 and len(set(widths)) == 2 for widths in lanes)
    serial, overlapped = runs[False], runs[True]
    for (name, a), (other, b) in zip(serial.model.state_dict().items(), overlapped.model.state_dict().items()):
        assert name == other and torch.equal(a, b), name
    reports = serial.report.stages[0].layers, overlapped.report.stages[0].layers
    assert list(reports[0]) == list(reports[1])
    for name, report in reports[0].items():
        assert {k: v for k, v in report.items() if k not in TIMES} == {
            k: v for k, v in reports[1][name].items() if k not in TIMES
        }, name
        grids = serial.layers[name].quant, overlapped.layers[name].quant
        assert torch.equal(grids[0].scale, grids[1].scale), name


def test_a_failing_solve_on_a_lane_is_the_users_error(run_recipe, monkeypatch):
    """A solve raising on a lane (here the widest, solved first) surfaces as that error."""

    def failing(self, kernels):
        raise gptq_method.UserError("the dampened Hessian is singular", self.layers[0].name)

    monkeypatch.setattr(gptq_method._Group, "solve", failing)
    stage = {"method": "gptq", "bits": 4, "group_size": 32, "overlap": True}
    with pytest.raises(gptq_method.UserError, match="singular") as raised:
        run_recipe({"stages": [stage], "output": None})
    assert raised.value.where.endswith("down_proj")


def block() -> nn.Module:
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    module.register_buffer("scale", torch.ones(8))
    return module


def test_a_prefetch_is_dropped_when_the_block_changed_since():
    unchanged = block()
    assert _Prefetch(unchanged).still_valid(unchanged)

    def scaled(module: nn.Module) -> None:
        with torch.no_grad():
            module[0].weight.mul_(2)

    changes = {
        "in place": scaled,
        "new storage": lambda m: setattr(m[0].weight, "data", m[0].weight.data.clone()),
        "buffer replaced": lambda m: setattr(m, "scale", torch.zeros(8)),
        "parameter added": lambda m: m[1].register_parameter("extra", nn.Parameter(torch.zeros(1))),
        "submodule replaced": lambda m: m.__setitem__(0, nn.Linear(8, 8)),
    }
    for label, change in changes.items():
        module = block()
        job = _Prefetch(module)
        change(module)
        assert not job.still_valid(module), label


def test_the_mover_is_onloaded_off_cuda():
    """Off CUDA (or not enabled) the mover prefetches nothing and onloads as ``onloaded`` does."""
    module = block()
    storage = module[0].weight.data_ptr()
    with BlockMover(torch.device("cpu")) as mover:
        assert not mover.enabled
        mover.prefetch(module)
        with mover.onloaded(module) as same, onloaded(module, torch.device("cpu")) as plain:
            assert same is module and plain is module and module[0].weight.data_ptr() == storage


def test_staging_views_hold_each_tensor_apart_and_the_buffer_is_reused():
    """The mover's staging buffer: every tensor of a block gets its own aligned, contiguous view
    (writing all and reading back gives each tensor unchanged); a block that fits reuses the
    buffer, a larger one gets a new one."""
    made = []

    def allocate(size: int) -> torch.Tensor:
        made.append(size)
        return torch.empty(size, dtype=torch.uint8)

    staging = StagingBuffer(allocate)
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        torch.randint(0, 9, (7,), generator=generator),
        torch.rand(3, generator=generator) > 0.5,
        torch.randn(2, 2, 2, generator=generator),
        torch.empty(0),
    ]
    views = staging.views(tensors)
    for view, tensor in zip(views, tensors):
        view.copy_(tensor)
    for view, tensor in zip(views, tensors):
        assert view.is_contiguous() and view.dtype == tensor.dtype and torch.equal(view, tensor)
        assert (view.data_ptr() - staging.buffer.data_ptr()) % StagingBuffer.ALIGNMENT == 0
    assert made == [64 * 4]  # 30, 56, 3, 32 and 0 bytes, each rounded up to 64
    staging.views(tensors[:2])
    assert made == [256]
    staging.views([torch.empty(100)])
    assert made == [256, 448]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mover copies only on CUDA")
def test_on_cuda_blocks_come_back_into_their_host_tensors_with_what_they_became():
    """Blocks prefetched, changed on the device and written back through the page-locked
    staging buffer: each parameter is held in its own host tensor again, with the device's
    values; buffers come back unchanged."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    blocks = [block() for _ in range(3)]
    for module in blocks:
        for parameter in module.parameters():
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator))
    hosts = [[parameter.data for parameter in module.parameters()] for module in blocks]
    expected = [[2 * tensor + index for tensor in tensors] for index, tensors in enumerate(hosts)]
    with BlockMover(device) as mover:
        mover.prefetch(blocks[0])
        for index, module in enumerate(blocks):
            if index + 1 < len(blocks):
                mover.prefetch(blocks[index + 1])
            with mover.onloaded(module):
                assert all(tensor.is_cuda for tensor in [*module.parameters(), *module.buffers()])
                for parameter in module.parameters():
                    parameter.data.mul_(2).add_(index)
        assert mover._staging.buffer.is_pinned()
    for module, tensors, wanted in zip(blocks, hosts, expected):
        for parameter, host, want in zip(module.parameters(), tensors, wanted):
            assert parameter.data.data_ptr() == host.data_ptr() and torch.equal(parameter.data, want)
        assert module.scale.device.type == "cpu" and torch.equal(module.scale, torch.ones(8))
