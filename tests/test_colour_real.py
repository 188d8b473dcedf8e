"""Colour drizzle of real one-shot-colour frames (../shared/data/m27-cfa, RGGB)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import drizzlestack as ds
from drizzlestack import cfa

from conftest import SHARED_DATA
from fidelity import nyquist_ratio

ROI = (400, 300, 320, 240)


@pytest.fixture(scope="module")
def m27(tmp_path_factory):
    files = sorted((SHARED_DATA / "m27-cfa").glob("*.fits.gz"))
    if not files:
        pytest.skip("real frames not available (../shared/data/m27-cfa)")
    d = tmp_path_factory.mktemp("m27")
    ds.ingest(files, d / "stack.zarr")
    ds.register(d / "stack.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ds.DrizzlestackWarning)
        result = ds.drizzle(d / "stack.zarr", scale=2.0, pixfrac=0.9, roi=ROI, output=d / "m27.fits", tile=256)
    # six frames may leave a few pixels without red or blue: that warning only
    assert all("dry fraction" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return d, ds.open_stack(d / "stack.zarr"), result




def test_m27_is_read_as_rggb_and_its_two_greens_match(m27):
    _, stack, _ = m27
    assert set(stack.cfa_pattern.values) == {"RGGB"}
    assert set(stack.status.values) == {"ok"}
    frame = stack.frames[0].values
    idx = cfa.channel_index("RGGB", frame.shape)
    greens = [frame[dy::2, dx::2] for dy in (0, 1) for dx in (0, 1) if idx[dy, dx] == 1]
    others = [frame[dy::2, dx::2] for dy in (0, 1) for dx in (0, 1) if idx[dy, dx] != 1]
    g1, g2 = (np.median(g) for g in greens)
    assert abs(g1 - g2) <= 0.01 * g1  # the two greens are one colour...
    r, b = (np.median(o) for o in others)
    assert abs(r - b) > 0.2 * g1  # ...and the pattern read is not off by a pixel (R and B differ)


def test_m27_drizzles_to_rgb_without_a_bayer_grid(m27):
    d, _, result = m27
    from astropy.io import fits

    img = result["drizzle"].values
    assert img.shape == (3, 2 * ROI[3], 2 * ROI[2])
    with fits.open(d / "m27.fits") as hdul:
        assert hdul[0].header["NAXIS3"] == 3 and "BAYERPAT" not in hdul[0].header
    for c in range(3):
        assert nyquist_ratio(img[c]) <= 3.0, c
    # The mosaic drizzled as grey carries the grid (the test can fail).
    grey = ds.ingest(sorted((SHARED_DATA / "m27-cfa").glob("*.fits.gz"))[:1], d / "grey.zarr", cfa="grey")
    raw = grey.frames[0].values[ROI[1]:ROI[1] + ROI[3], ROI[0]:ROI[0] + ROI[2]]
    assert nyquist_ratio(np.kron(raw, np.ones((2, 2)))) > 30
