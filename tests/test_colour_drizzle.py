"""Colour (CFA) drizzle: each raw sample drops only into its own channel, in one pass.

The in-memory kernels are checked against the grey kernels run once per channel with
the other channels' weights set to zero (the definition of "each sample only into its
own channel"); the tiled step against the simulator's per-channel truth."""

from __future__ import annotations

import numpy as np
import pytest

from drizzlestack import cfa
from drizzlestack.drizzle import array as _array
from drizzlestack.drizzle import drizzle_array

RNG = np.random.default_rng(5)


def _pixmap(shape, scale=2.0, angle=0.3, shift=(0.37, -0.21)):
    y, x = np.indices(shape, dtype=float)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    xo = scale * (c * x - s * y + shift[0] + 0.5) - 0.5
    yo = scale * (s * x + c * y + shift[1] + 0.5) - 0.5
    return np.dstack([xo, yo])


@pytest.mark.parametrize("kernel", _array.KERNELS)
@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
def test_each_sample_drops_only_into_its_own_channel(kernel, pattern):
    shape = (17, 19)
    data = RNG.normal(100, 10, shape)
    data[4, 5] = np.nan
    weights = RNG.uniform(0.5, 1.5, shape)
    pixmap = _pixmap(shape)
    out_shape = (36, 40)
    chan = cfa.channel_index(pattern, shape)
    pixfrac = 1.0 if kernel.startswith("lanczos") else 0.7
    img, wht = drizzle_array(data, pixmap, out_shape, kernel=kernel, pixfrac=pixfrac, weights=weights,
                             pixel_scale_ratio=0.5, channel=chan)
    assert img.shape == wht.shape == (3,) + out_shape
    for c in range(3):
        ref_img, ref_wht = drizzle_array(data, pixmap, out_shape, kernel=kernel, pixfrac=pixfrac,
                                         weights=np.where(chan == c, weights, 0.0), pixel_scale_ratio=0.5)
        assert np.array_equal(np.isnan(img[c]), np.isnan(ref_img)), c
        np.testing.assert_allclose(wht[c], ref_wht, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(img[c], ref_img, rtol=1e-12, equal_nan=True)


def test_colour_coverage_counts_per_channel():
    shape = (12, 12)
    chan = cfa.channel_index("RGGB", shape)
    acc_wv, acc_w = np.zeros((3, 24, 24)), np.zeros((3, 24, 24))
    cover = np.zeros((3, 24, 24), dtype=np.uint16)
    for shift in ((0.1, 0.2), (0.6, 0.4)):
        _array.accumulate(np.ones(shape), _pixmap(shape, angle=0, shift=shift), None, acc_wv, acc_w,
                          kernel="square", pixfrac=1.0, coverage=cover, channel=chan)
    for c in range(3):
        ref_wv, ref_w = np.zeros((24, 24)), np.zeros((24, 24))
        ref_cover = np.zeros((24, 24), dtype=np.uint16)
        for shift in ((0.1, 0.2), (0.6, 0.4)):
            _array.accumulate(np.ones(shape), _pixmap(shape, angle=0, shift=shift), (chan == c).astype(float),
                              ref_wv, ref_w, kernel="square", pixfrac=1.0, coverage=ref_cover)
        assert np.array_equal(cover[c], ref_cover)


def test_colour_accumulators_need_a_channel_index_and_the_reverse():
    shape = (6, 6)
    with pytest.raises(ValueError, match="channel="):
        _array.accumulate(np.ones(shape), _pixmap(shape), None, np.zeros((3, 12, 12)), np.zeros((3, 12, 12)))
    with pytest.raises(ValueError, match="2-D"):
        _array.accumulate(np.ones(shape), _pixmap(shape), None, np.zeros((12, 12)), np.zeros((12, 12)),
                          channel=np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match="below"):
        _array.accumulate(np.ones(shape), _pixmap(shape), None, np.zeros((2, 12, 12)), np.zeros((2, 12, 12)),
                          channel=np.full(shape, 2, np.uint8))
