"""Exact storage of a kl_ptq layer in bits: codes, scales, zero points, outlier values and positions."""

from __future__ import annotations

import math
from typing import Literal

SCALE_BITS = 16
"""Bits of one stored scale (fp16/bf16), as ``compress_rtn.method.storage_bits`` counts it."""
ZERO_POINT_BITS = 8
"""Bits of one stored zero point (int8), asymmetric grids only."""


def storage_parts(
    shape: tuple[int, int],
    width: int,
    bits: int,
    symmetric: bool,
    outliers: int,
    groups_with_outliers: int,
    outlier_bits: int,
    outlier_index: Literal["csr", "bitmap"],
) -> dict[str, int]:
    """Bits of each part of a ``shape`` = (rows, columns) layer whose groups are ``width`` columns
    wide and which holds ``outliers`` outliers in ``groups_with_outliers`` groups.

    The dense inlier code matrix has a ``bits``-bit code at every position (outlier positions
    hold a placeholder); every group stores a 16-bit scale (and an 8-bit zero point when
    asymmetric); each outlier an ``outlier_bits`` code, and each group holding outliers a scale
    (and zero point) of the outlier grid; the positions as CSR (a ceil(log2 columns)-bit column
    index per outlier and a ceil(log2(columns + 1))-bit count per row) or as a one-bit mask per
    weight. A layer without outliers pays for no outlier structure.
    """
    rows, columns = shape
    weights = rows * columns
    per_group = SCALE_BITS + (0 if symmetric else ZERO_POINT_BITS)
    if outliers == 0:
        index = 0
    elif outlier_index == "csr":
        index = outliers * math.ceil(math.log2(columns)) + rows * math.ceil(math.log2(columns + 1))
    else:
        index = weights
    return {
        "inlier_codes": weights * bits,
        "inlier_scales": weights // width * per_group,
        "outlier_codes": outliers * outlier_bits,
        "outlier_scales": groups_with_outliers * per_group,
        "outlier_index": index,
    }


def storage_range(
    shape: tuple[int, int],
    width: int,
    bits: int,
    symmetric: bool,
    fraction: float,
    outlier_bits: int,
    outlier_index: Literal["csr", "bitmap"],
) -> tuple[int, int]:
    """The fewest and the most bits a layer of ``shape`` can take with ``round(fraction × weights)``
    outliers (the count a fraction gives exactly): the outliers packed into as few groups as they
    fill, or spread one to a group over as many as there are. Only the groups the outliers touch,
    which the weights decide, are unknown from the shape; without outliers both ends are exact."""
    weights = shape[0] * shape[1]
    outliers = round(fraction * weights)
    fewest, most = math.ceil(outliers / width), min(outliers, weights // width)
    low, high = (
        sum(storage_parts(shape, width, bits, symmetric, outliers, groups, outlier_bits, outlier_index).values())
        for groups in (fewest, most)
    )
    return low, high
