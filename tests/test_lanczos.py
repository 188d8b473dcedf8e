"""The one Lanczos table (``drizzlestack.lanczos``) shared by the registered view's
resampling and drizzle's lanczos kernels, against ``np.sinc`` (an independent formula:
``sin(pi x) / (pi x)``)."""

from __future__ import annotations

import numpy as np
import pytest

from drizzlestack.lanczos import LUT_DENSITY, lanczos_table, lanczos_taps


def _lanczos(x, order):
    return np.where(np.abs(x) < order, np.sinc(x) * np.sinc(x / order), 0.0)


@pytest.mark.parametrize("order", [2, 3])
def test_table_samples_and_interpolation_match_sinc(order):
    lut = lanczos_table(order)
    n = order * LUT_DENSITY
    assert lut.shape == (n + 2,)
    np.testing.assert_allclose(lut[:n + 1], _lanczos(np.arange(n + 1) / LUT_DENSITY, order), rtol=0, atol=1e-15)
    assert lut[0] == 1.0 and lut[n] == 0.0 and lut[n + 1] == 0.0
    # linear interpolation between samples, as both users do, is within the documented 3.1e-8
    x = np.random.default_rng(order).uniform(0, order, 200_000)
    u = x * LUT_DENSITY
    k = u.astype(int)
    approx = lut[k] + (u - k) * (lut[k + 1] - lut[k])
    assert np.abs(approx - _lanczos(x, order)).max() < 3.1e-8


def test_taps_are_the_table_samples_at_each_tap_offset():
    order = 3
    taps = lanczos_taps(order)
    assert taps.shape == (LUT_DENSITY + 1, 2 * order)
    f = np.arange(LUT_DENSITY + 1)[:, None] / LUT_DENSITY
    offsets = np.arange(-order + 1, order + 1)[None, :]
    np.testing.assert_allclose(taps, _lanczos(offsets - f, order), rtol=0, atol=1e-15)
    # f = 0: the sample sits on a pixel, whose tap (offset 0) has weight exactly 1
    assert taps[0, order - 1] == 1.0


def test_tables_are_read_only():
    with pytest.raises(ValueError):
        lanczos_table(3)[5] = 0.0
    with pytest.raises(ValueError):
        lanczos_taps(3)[5, 0] = 0.0


@pytest.mark.parametrize("order", [0, -1, 2.5, "3", True])
def test_a_bad_order_is_refused_by_name(order):
    with pytest.raises(ValueError, match="order"):
        lanczos_table(order)
