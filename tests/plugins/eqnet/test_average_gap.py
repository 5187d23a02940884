"""The reachable-averages programme behind ``average_bits`` budgets, against brute force and at ``recipe check``."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from compress_eqnet.efficiency import AVERAGE_TOLERANCE, average_gap, reachable_averages

from compress.cli import cli
from tests.plugins.eqnet.conftest import eqnet_recipe

TOL = AVERAGE_TOLERANCE


def brute_force(weights: list[float], bits: list[int]) -> np.ndarray:
    """Every weighted average of one choice of ``bits`` per layer, sorted."""
    total = sum(weights)
    choices = itertools.product(bits, repeat=len(weights))
    return np.array(sorted({sum(b * w for b, w in zip(choice, weights)) / total for choice in choices}))


def random_costs(rng: random.Random) -> tuple[list[float], list[int]]:
    """A few layers whose weights span three orders of magnitude (one may dominate), and 1..3 widths."""
    weights = [float(rng.randint(1, 10 ** rng.randint(1, 4))) for _ in range(rng.randint(1, 6))]
    return weights, sorted(rng.sample(range(2, 9), rng.randint(1, 3)))


def distance(values: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Per value, the distance to the nearest of ``to``."""
    return np.abs(values[:, None] - to[None, :]).min(axis=1)


@pytest.mark.parametrize("seed", range(40))
def test_the_figures_are_the_reachable_averages_within_the_tolerance(seed):
    weights, bits = random_costs(random.Random(seed))
    figures, exact = reachable_averages(weights, bits), brute_force(weights, bits)
    assert np.all(np.diff(figures) > 0)
    assert distance(exact, figures).max() <= TOL + 1e-12
    assert distance(figures, exact).max() <= TOL + 1e-12


@pytest.mark.parametrize("seed", range(40))
def test_a_gap_is_a_window_no_choice_reaches_with_the_nearest_averages(seed):
    weights, bits = random_costs(random.Random(seed))
    exact = brute_force(weights, bits)
    gaps = 0
    for c in np.arange(1.5, 9.01, 0.05):
        low, high = c - 0.5, c
        gap = average_gap(weights, bits, low, high)
        inside = exact[(exact > low) & (exact <= high)]
        if gap is None:
            assert np.any((exact > low - TOL) & (exact <= high + TOL)), (c, exact)
            continue
        gaps += 1
        assert inside.size == 0, (c, inside)
        below, above = exact[exact <= low], exact[exact > high]
        for figure, nearest in zip(gap, (below[-1] if below.size else None, above[0] if above.size else None)):
            assert (figure is None) == (nearest is None)
            assert figure is None or abs(figure - nearest) <= TOL + 1e-12
    assert gaps > 0  # c below 2 and above 8.5 at least


def test_a_dominant_layer_leaves_a_gap_between_its_widths():
    """Two layers, one 99% of the weights: with 2 or 8 bits the averages are 2, 2.06, 7.94 and 8."""
    assert average_gap([1, 99], [2, 8], 4.5, 5) == pytest.approx((2.06, 7.94), abs=TOL)
    assert average_gap([1, 99], [2, 4, 8], 3.5, 4) is None


def test_a_few_hundred_layers_stay_within_the_tolerance_of_the_uniform_averages():
    rng = random.Random(0)
    weights = [float(rng.randint(100, 2_000_000)) for _ in range(300)]
    figures = reachable_averages(weights, [2, 3, 4, 5, 6, 7, 8])
    assert abs(figures[0] - 2) <= TOL and abs(figures[-1] - 8) <= TOL
    assert np.diff(figures).max() < 0.01  # so many layers fill the range: no gap


# The tiny ResNet's middle layers (the first and last stay at 8 bits): parameters 576, 576, 128,
# 1152 and 2304 (of 4736), input elements per image 512, 512, 512, 512 and 256 (of 2304).
WEIGHTS_BELOW, WEIGHTS_ABOVE = 2 + 6 * (576 + 128 + 1152) / 4736, 2 + 6 * 2304 / 4736  # 8 bits on those
INPUTS_BELOW, INPUTS_ABOVE = 2 + 6 * 768 / 2304, 2 + 6 * 1024 / 2304


@pytest.mark.parametrize(
    ("average_bits", "side", "nearest"),
    [(4.9, "weight", (WEIGHTS_BELOW, WEIGHTS_ABOVE)), (4.6, "input", (INPUTS_BELOW, INPUTS_ABOVE))],
)
def test_recipe_check_refuses_an_average_bits_window_in_a_gap(eqnet_assets, tmp_path, average_bits, side, nearest):
    """A supernet of 2- and 8-bit layers only: averages come in steps, and a window between two is
    refused in one line with the averages either side, before any training."""
    model, images = eqnet_assets
    raw = eqnet_recipe(model, images, tmp_path / "out", search={"average_bits": average_bits}, w_bits=[2, 8])
    raw["stages"][0]["a_bits"] = [2, 8]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["recipe", "check", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    window = f"({average_bits - 0.5:g}, {average_bits:g}]"
    pattern = rf"average_bits: {average_bits:g} — no sub-network's {side} bits average in {re.escape(window)}; "
    found = re.search(pattern + r"nearest reachable: (\S+) and (\S+)$", lines[0])
    assert found, lines[0]
    assert [float(figure) for figure in found.groups()] == pytest.approx(nearest, abs=TOL + 0.005)  # shown: .2f
    assert not (tmp_path / "out").exists()


def test_recipe_check_passes_an_average_bits_window_a_subnet_reaches(host, eqnet_assets, tmp_path):
    """At 5 bits the window (4.5, 5] holds 8-bit weights on 2304 parameters and 8-bit inputs on 1024 elements."""
    from compress.validate import check_recipe

    model, images = eqnet_assets
    raw = eqnet_recipe(model, images, tmp_path / "out", search={"average_bits": 5}, w_bits=[2, 8])
    raw["stages"][0]["a_bits"] = [2, 8]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    check_recipe(host, path)
