"""The one median of a sorted slice, shared by the rejection methods and the frame
statistics, against :func:`numpy.median` (whose float32 rounding the statistics keep)."""

from __future__ import annotations

import numpy as np
import pytest

from drizzlestack.integration import stats
from drizzlestack.integration.rejection import sorting


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_of_a_sorted_slice_is_numpys(dtype):
    rng = np.random.default_rng(4)
    v = np.sort(rng.normal(999.4, 3e-4, 301).astype(dtype))  # close values: the sum's rounding shows
    for a, b in [(0, 301), (0, 300), (3, 298), (10, 11), (7, 9)]:
        got = sorting._median_sorted(v, a, b)
        assert got == np.float64(np.median(v[a:b])), (a, b)
        assert isinstance(got, float)


def test_median_of_an_empty_slice_is_nan():
    assert np.isnan(sorting._median_sorted(np.arange(4.0), 2, 2))


def test_the_statistics_use_the_same_median():
    assert stats._median_sorted is sorting._median_sorted
